from roast_vllm.cli import main

main()
