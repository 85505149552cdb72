"""Ahead-of-time compile of every Triton kernel for Hopper (sm_90a) on a machine without a GPU.

The interpreter tests check the maths; this file checks that the real code-generation path
(Triton → TTGIR → PTX → ptxas) accepts the kernels at the exact tile configurations the
launchers pick for the SePiCo shape (A = 512, C = 19, M = 200), and reads ptxas' resource
report: shared memory within the 227 KB of an H100 SM and no register spills on the
half-precision (AMP) fast paths. Nothing is executed; GPU speed is not measured here.

Compilation runs in a subprocess without TRITON_INTERPRET (tests/conftest.py sets it for
this process, and Triton's interpreter patches ``triton.language`` in a way the compiler
cannot share).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

A, C, M = 512, 19, 200
SMEM_LIMIT = 227 * 1024
DTYPES = ("bf16", "fp16", "fp32")
# integer arguments the launcher sees divisible by 16 at A = 512 (Triton specialises them)
DIV16 = {"A", "stride_zn", "stride_gn", "stride_bc"}
ONES = {"stride_za"}  # contiguous rows: Triton specialises a stride of 1 to a constant


def _ptxas(triton):
    base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):  # Triton uses the newer one for sm_90+
        if os.path.exists(os.path.join(base, name)):
            return os.path.join(base, name)
    return None


def _compile(kernel, ptr_types: dict, float_args: set, config: dict, cc: int = 90) -> dict:
    """Compile ``kernel`` for sm_90a (or sm_<cc>) and return ptxas' registers / spills and the
    shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    opts = {k: config[k] for k in ("num_warps", "num_stages") if k in config}
    const = {k: v for k, v in config.items() if k not in opts}
    const.update({name: 1 for name in kernel.arg_names if name in ONES})
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in const:
            sig[name] = "constexpr"
            continue
        sig[name] = (ptr_types.get(name, "*fp32") if name.endswith("_ptr")
                     else "fp32" if name in float_args else "i32")
        if name.endswith("_ptr") or name in DIV16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(kernel, sig, const, attrs),
                              target=GPUTarget("cuda", cc, 32), options=opts)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([_ptxas(triton), "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{cc}{'a' if cc == 90 else ''}",
                              ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, timeout=300)
    log = out.stdout + out.stderr
    if out.returncode != 0:
        return {"error": log[-2000:]}
    return {"regs": int(re.search(r"Used (\d+) registers", log).group(1)),
            "spill": int(re.search(r"(\d+) bytes spill stores", log).group(1)),
            "shared": compiled.metadata.shared}


def compile_all() -> dict:
    """Every kernel at its launcher configuration; run in a process without TRITON_INTERPRET."""
    import torch
    from sepico_fast.kernels import bank_contrast, dist_contrast, moments

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    results = {}
    for dt in DTYPES:
        t = "*" + dt
        for use_var in (True, False):
            cfg = dist_contrast.kernel_config(torch_dtype[dt], A, C, use_var=use_var)
            results[f"dist-{dt}-{use_var}"] = _compile(
                dist_contrast._dist_contrast_fwd_kernel,
                {"z_ptr": t, "g_ptr": t, "lab_ptr": "*i64"}, {"inv_tau", "var_coef"}, cfg)
        cfg = dist_contrast.kernel_config(torch_dtype[dt], A, C, has_reg=False, scaled=True,
                                          has_gvec=True)  # grad_mode="recompute" backward
        results[f"dist-{dt}-recompute"] = _compile(
            dist_contrast._dist_contrast_fwd_kernel,
            {"z_ptr": t, "g_ptr": t, "lab_ptr": "*i64"}, {"inv_tau", "var_coef"}, cfg)
        cfg = bank_contrast.kernel_config(torch_dtype[dt], A, C, M)
        results[f"bank-{dt}"] = _compile(
            bank_contrast._bank_contrast_fwd_kernel,
            {"z_ptr": t, "g_ptr": t, "bank_ptr": t, "lab_ptr": "*i64", "perm_ptr": "*i64",
             "blen_ptr": "*i64"}, {"inv_tau"}, cfg)
        cfg = moments.kernel_config(torch_dtype[dt], A, C)
        results[f"moments-{dt}"] = _compile(moments._class_moments_partial_kernel,
                                            {"z_ptr": t, "lab_ptr": "*i64"}, set(), cfg)
        results[f"scale-{dt}"] = _compile(dist_contrast._scale_grad_kernel,
                                          {"g_ptr": t, "lab_ptr": "*i64"}, set(),
                                          dict(dist_contrast.scale_grad_config(A), HAS_VEC=True))
    # sm_75 (T4: 64 KB of shared memory per block): the bank kernel's smaller tile there
    cfg = bank_contrast.kernel_config(torch.float16, A, C, M, capability=(7, 5))
    results["bank-fp16-sm75"] = _compile(
        bank_contrast._bank_contrast_fwd_kernel,
        {"z_ptr": "*fp16", "g_ptr": "*fp16", "bank_ptr": "*fp16", "lab_ptr": "*i64",
         "perm_ptr": "*i64", "blen_ptr": "*i64"}, {"inv_tau"}, cfg, cc=75)
    results["merge"] = _compile(moments._class_moments_merge_kernel, {}, set(),
                                dict(BLOCK=512, num_warps=4))
    return results


@pytest.fixture(scope="module")
def sm90():
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"this Triton has no ahead-of-time compile API: {exc}")
    if _ptxas(triton) is None:
        pytest.skip("Triton's bundled ptxas is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check(res, *, spill_limit=0):
    assert "error" not in res, res.get("error")
    assert res["shared"] <= SMEM_LIMIT, res
    assert res["spill"] <= spill_limit, res


@pytest.mark.parametrize("dt", DTYPES)
def test_dist_proto_kernel_compiles_without_spills(sm90, dt):
    _check(sm90[f"dist-{dt}-True"])
    _check(sm90[f"dist-{dt}-False"])
    _check(sm90[f"dist-{dt}-recompute"])


@pytest.mark.parametrize("dt", DTYPES)
def test_bank_kernel_compiles(sm90, dt):
    # fp32 features use 3xTF32 products: a documented few-hundred-byte spill on that path
    _check(sm90[f"bank-{dt}"], spill_limit=0 if dt != "fp32" else 1024)


def test_bank_kernel_fits_sm75_shared_memory(sm90):
    """The sm_75 tile fits T4's 64 KB per block (the default tile needs 68 KB there); it
    spills registers on sm_75's smaller MMA shapes, which is slower, not wrong."""
    res = sm90["bank-fp16-sm75"]
    assert "error" not in res, res.get("error")
    assert res["shared"] <= 64 * 1024, res


@pytest.mark.parametrize("dt", DTYPES)
def test_class_moments_and_scale_kernels_compile_without_spills(sm90, dt):
    _check(sm90[f"moments-{dt}"])
    _check(sm90[f"scale-{dt}"])
    _check(sm90["merge"])


if __name__ == "__main__":
    print(json.dumps(compile_all()))
