"""Kernels with their pure-torch references (installed as ``roast_vllm.kernels``).

The ops are callable by their names::

    roast_vllm.kernels.grouped_css(D, w, g, mode="max_norm", grouped=True, reduction="mean")  # [L, H]
    roast_vllm.kernels.steer_apply(h, table, slot, scale)                    # in place on h
    roast_vllm.kernels.steer_mlp_act(act, up, table, slot, scale)            # in place on act
    roast_vllm.kernels.fusion_mean(h, res, table, coef, msum, meta)          # in place on h, msum

Each op's module (same name: kernel -> launcher ``<op>_triton`` -> op, with ``<op>_ref``
beside them) stays importable by its full name, ``from roast_vllm.kernels.steer_apply import
steer_apply_ref``; the package attribute is the op itself. For the module object use
``importlib.import_module("roast_vllm.kernels.steer_apply")``.
"""

# Importing every op module here, once, is what keeps the package attributes the ops: the
# import system binds a submodule to its parent's attribute only on first import.
from roast_vllm.kernels.fusion_mean import fusion_mean
from roast_vllm.kernels.grouped_css import grouped_css
from roast_vllm.kernels.steer_apply import steer_apply
from roast_vllm.kernels.steer_mlp_act import steer_mlp_act

__all__ = ["fusion_mean", "grouped_css", "steer_apply", "steer_mlp_act"]
