"""Finding the CUDA toolkit for the extension build (sepico_fast/_cuda_toolkit.py, setup.py).

Fake toolkit trees in a temporary folder stand in for real installs: a toolkit is a folder
with ``include/cuda_runtime.h``, ``bin/nvcc`` and ``lib64/libcudart.so`` (or ``lib/``). The setup.py tests run it in a subprocess
on a copy of the files it reads, with ``torch.version.cuda`` faked, so they need no GPU and
no CUDA build of torch.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from sepico_fast import _cuda_toolkit as tk

ROOT = Path(__file__).resolve().parents[1]


def make_toolkit(root: Path, version: int = 13000, lib: str | None = "lib64") -> Path:
    (root / "include").mkdir(parents=True)
    (root / "bin").mkdir()
    if lib:
        (root / lib).mkdir()
        (root / lib / "libcudart.so.13").write_bytes(b"\x7fELF fake")
        (root / lib / "libcudart.so").symlink_to("libcudart.so.13")
    (root / "include" / "cuda_runtime.h").write_text("// fake\n")
    (root / "include" / "cuda.h").write_text(f"#define CUDA_VERSION {version}\n")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.0'\n")
    nvcc.chmod(0o755)
    return root


def make_wrapper(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "nvcc"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def which_from(path: Path | None):
    return lambda name: str(path) if (path is not None and name == "nvcc") else None


def no_run(*args, **kwargs):
    raise AssertionError("nvcc --dryrun must not be needed here")


def test_valid_cuda_home_wins(tmp_path):
    home = make_toolkit(tmp_path / "cuda-12.8")
    choice = tk.find_cuda_home({"CUDA_HOME": str(home)}, which_from(None), prefixes=(), run=no_run)
    assert choice.home == str(home) and choice.how == "$CUDA_HOME" and not choice.rejected


def test_wrapper_script_outside_the_toolkit(tmp_path):
    """A common install: /usr/local/bin/nvcc runs exec <toolkit>/bin/nvcc;
    torch's guess (the wrapper's parent folder) has no headers and is rejected."""
    home = make_toolkit(tmp_path / "cuda-13.0")
    wrapper = make_wrapper(tmp_path / "local" / "bin", f'exec {home}/bin/nvcc "$@"')
    choice = tk.find_cuda_home({}, which_from(wrapper), prefixes=(), run=no_run)
    assert choice.home == str(home)
    assert "wrapper" in choice.how
    assert any(str(tmp_path / "local") in r for r in choice.rejected), choice.rejected


def test_bad_cuda_home_is_rejected_and_named(tmp_path):
    home = make_toolkit(tmp_path / "cuda-13.0")
    wrapper = make_wrapper(tmp_path / "bin", f'exec "{home}/bin/nvcc" "$@"')
    choice = tk.find_cuda_home({"CUDA_HOME": str(tmp_path / "nothing")}, which_from(wrapper),
                               prefixes=(), run=no_run)
    assert choice.home == str(home)
    assert "$CUDA_HOME" in choice.rejected[0] and "cuda_runtime.h" in choice.rejected[0]
    assert "rejected" in choice.describe()


def test_toolkit_without_libcudart_is_rejected_and_lib_folder_is_accepted(tmp_path):
    """Headers and nvcc alone do not link: libcudart.so must be in lib64/ or lib/."""
    headers_only = make_toolkit(tmp_path / "cuda-13.0", lib=None)
    assert not tk.is_toolkit(str(headers_only))
    assert tk.missing_parts(str(headers_only)) == ["lib64/libcudart.so or lib/libcudart.so"]
    (headers_only / "lib64").mkdir()
    (headers_only / "lib64" / "libcudart_static.a").write_bytes(b"!<arch>")  # not what -lcudart links
    choice = tk.find_cuda_home({"CUDA_HOME": str(headers_only)}, which_from(None), prefixes=(), run=no_run)
    assert choice.home is None and "libcudart.so" in choice.rejected[0] and "$CUDA_HOME" in choice.rejected[0]
    conda_like = make_toolkit(tmp_path / "env", lib="lib")
    assert tk.is_toolkit(str(conda_like)) and tk.missing_parts(str(conda_like)) == []
    no_nvcc = make_toolkit(tmp_path / "cuda-12.8", 12080)
    (no_nvcc / "bin" / "nvcc").unlink()
    assert tk.missing_parts(str(no_nvcc)) == ["bin/nvcc"]
    # the standard prefix skips the broken trees and takes the complete one
    make_toolkit(tmp_path / "prefix" / "cuda-12.4", 12040)
    (tmp_path / "prefix" / "cuda-13.0").symlink_to(headers_only)
    choice = tk.find_cuda_home({}, which_from(None), prefixes=(str(tmp_path / "prefix"),),
                               torch_cuda="13.0", run=no_run)
    assert choice.home == str(tmp_path / "prefix" / "cuda-12.4")


def test_symlinked_nvcc(tmp_path):
    home = make_toolkit(tmp_path / "opt" / "cuda")
    (tmp_path / "bin").mkdir()
    link = tmp_path / "bin" / "nvcc"
    link.symlink_to(home / "bin" / "nvcc")
    choice = tk.find_cuda_home({}, which_from(link), prefixes=(), run=no_run)
    assert choice.home == str(home) and choice.how == "symlink target of nvcc on PATH"


def test_opaque_wrapper_is_asked_with_dryrun(tmp_path):
    """A wrapper naming no path (here via a variable) is resolved by nvcc --dryrun's _HERE_."""
    home = make_toolkit(tmp_path / "cuda-13.0")
    wrapper = make_wrapper(tmp_path / "bin", 'exec "$REAL_NVCC" "$@"')
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        assert cmd[0] == str(wrapper) and "--dryrun" in cmd
        return subprocess.CompletedProcess(cmd, 0, "", f"#$ _NVVM_BRANCH_=nvvm\n#$ _HERE_={home}/bin\n")

    choice = tk.find_cuda_home({}, which_from(wrapper), prefixes=(), run=run)
    assert calls and choice.home == str(home) and "dryrun" in choice.how


def test_standard_prefix_prefers_torch_major_then_default_link_then_newest(tmp_path):
    make_toolkit(tmp_path / "cuda-12.4", 12040)
    make_toolkit(tmp_path / "cuda-12.8", 12080)
    make_toolkit(tmp_path / "cuda-13.0", 13000)
    both = dict(environ={}, which=which_from(None), prefixes=(str(tmp_path),), run=no_run)
    assert tk.find_cuda_home(torch_cuda="12.6", **both).home == str(tmp_path / "cuda-12.8")
    assert tk.find_cuda_home(torch_cuda="13.0", **both).home == str(tmp_path / "cuda-13.0")
    assert tk.find_cuda_home(torch_cuda=None, **both).home == str(tmp_path / "cuda-13.0")
    (tmp_path / "cuda").symlink_to(tmp_path / "cuda-12.4")
    assert tk.find_cuda_home(torch_cuda="12.1", **both).home == str(tmp_path / "cuda")
    # a toolkit of the wrong major is still used when it is the only one
    assert tk.find_cuda_home(torch_cuda="11.8", **both).home in {
        str(tmp_path / n) for n in ("cuda", "cuda-12.4", "cuda-12.8", "cuda-13.0")}


def test_nothing_found_says_where_it_looked(tmp_path):
    wrapper = make_wrapper(tmp_path / "bin", "exit 1")
    choice = tk.find_cuda_home({}, which_from(wrapper), prefixes=(str(tmp_path / "none"),),
                               run=lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", ""))
    assert choice.home is None
    assert "no CUDA toolkit found" in choice.describe() and str(tmp_path / "bin") not in choice.how


def test_extension_runs_on():
    assert tk.extension_runs_on((7, 5))      # T4, RTX 2080 Ti
    assert tk.extension_runs_on((8, 6))      # sm_80 SASS runs on sm_86
    assert tk.extension_runs_on((9, 0))
    assert tk.extension_runs_on((12, 0))     # PTX JIT
    assert not tk.extension_runs_on((7, 0))  # V100: no code
    assert not tk.extension_runs_on((6, 1))
    flags = tk.nvcc_gencode_flags()
    assert "arch=compute_75,code=sm_75" in flags and "arch=compute_90,code=compute_90" in flags


# ----------------------------------------------------------------------------- setup.py
def _setup_tree(tmp_path: Path) -> Path:
    """The files setup.py reads, copied, so a run cannot touch the checkout; the copy's
    standard prefix (/usr/local) points into tmp_path, so the machine's own toolkits are
    not seen."""
    tree = tmp_path / "src"
    for rel in ("setup.py", "sepico_fast/__init__.py", "sepico_fast/_cuda_toolkit.py",
                "sepico_fast/ops/__init__.py", "kernels/__init__.py"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tree / rel)
    module = tree / "sepico_fast" / "_cuda_toolkit.py"
    default = 'prefixes: Sequence[str] = ("/usr/local",)'
    assert default in module.read_text()
    module.write_text(module.read_text().replace(default, f'prefixes: Sequence[str] = ("{tmp_path}",)'))
    shutil.copytree(ROOT / "csrc", tree / "csrc")
    return tree


def _run_setup(tree: Path, env: dict, argv: list[str]) -> subprocess.CompletedProcess:
    code = ("import sys, json, torch, setuptools\n"
            "torch.version.cuda = '13.0'  # pretend to be a CUDA build of torch\n"
            "if sys.argv[1] == 'configure':\n"
            "    captured = {}\n"
            "    setuptools.setup = lambda **kw: captured.update(kw)\n"
            "    sys.argv = ['setup.py']\n"
            "else:\n"
            "    sys.argv = ['setup.py'] + sys.argv[1:]\n"
            "exec(open('setup.py').read(), {'__file__': 'setup.py', '__name__': '__main__'})\n"
            "if sys.argv == ['setup.py']:\n"
            "    import os\n"
            "    ext = captured['ext_modules']\n"
            "    print('RESULT', json.dumps({'cuda_home': os.environ.get('CUDA_HOME'),\n"
            "        'ext': [e.name for e in ext],\n"
            "        'nvcc': ext[0].extra_compile_args['nvcc'] if ext else None}))\n")
    full_env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=tree, env=full_env,
                          capture_output=True, text=True, timeout=240)


def _result(proc) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_setup_uses_the_toolkit_behind_a_wrapper_and_builds_sm75(tmp_path):
    tree = _setup_tree(tmp_path)
    home = make_toolkit(tmp_path / "cuda-13.0")
    make_wrapper(tmp_path / "bin", f'exec {home}/bin/nvcc "$@"')
    proc = _run_setup(tree, {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}, ["configure"])
    out = _result(proc)
    assert out["cuda_home"] == str(home) and out["ext"] == ["sepico_fast.ops._C"]
    assert "arch=compute_75,code=sm_75" in out["nvcc"]
    assert f"using CUDA_HOME={home}" in proc.stdout, "the choice is printed on stdout"


def test_setup_without_toolkit_skips_loudly_or_fails_when_required(tmp_path):
    tree = _setup_tree(tmp_path)
    empty = tmp_path / "emptybin"
    empty.mkdir()
    (empty / "python").symlink_to(sys.executable)
    env = {"PATH": str(empty), "CUDA_HOME": str(tmp_path / "nowhere")}
    proc = _run_setup(tree, env, ["configure"])
    assert _result(proc)["ext"] == []
    assert "CUDA extension not built" in proc.stdout
    status = json.loads((tree / "sepico_fast" / "ops" / "_ext_build.json").read_text())
    assert status["state"] == "skipped" and "nowhere" in status["detail"]
    proc = _run_setup(tree, {**env, "SEPICO_FAST_REQUIRE_EXT": "1"}, ["configure"])
    assert proc.returncode != 0 and "SEPICO_FAST_REQUIRE_EXT=1" in proc.stderr


def test_failed_build_is_printed_recorded_and_fatal_when_required(tmp_path):
    """A build that fails (here: a fake toolkit that cannot compile anything) is printed on
    stdout, recorded for the run-time warning, and an error under SEPICO_FAST_REQUIRE_EXT=1."""
    tree = _setup_tree(tmp_path)
    home = make_toolkit(tmp_path / "cuda-13.0")
    env = {"CUDA_HOME": str(home)}
    proc = _run_setup(tree, env, ["build_ext", "--inplace"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "WARNING: build failed" in proc.stdout
    status = json.loads((tree / "sepico_fast" / "ops" / "_ext_build.json").read_text())
    assert status["state"] == "failed" and str(home) in status["detail"]
    assert not list((tree / "sepico_fast" / "ops").glob("_C*.so"))
    proc = _run_setup(tree, {**env, "SEPICO_FAST_REQUIRE_EXT": "1"}, ["build_ext", "--inplace"])
    assert proc.returncode != 0
    status = json.loads((tree / "sepico_fast" / "ops" / "_ext_build.json").read_text())
    assert status["state"] == "failed"
