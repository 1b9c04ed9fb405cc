"""Compile LGAM's Triton kernels for NVIDIA GPUs here, without one: every kernel in the variants
the models meet (dtypes, layouts, block tail on/off, the block sizes the library picks for
resnet18, WRN-16-10 and ResNeXt-29 at G=4 and resnet18 at G=32), through Triton's real compiler
down to a cubin (its own LLVM and ptxas), and report each one's registers, spills (local stack)
and shared memory per thread block, from ``cuobjdump``. What it cannot tell: speed.

Fails (exit 1) on a compiler error or a kernel that spills more than ``--max-stack`` bytes.

    python scripts/triton_compile_check.py [--arch 80 90] [--quick]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":  # kernels decorated as interpreted ones have no compiler
    sys.exit("unset TRITON_INTERPRET: this script compiles the kernels for real")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lgam.attention import _lgam_triton as T  # noqa: E402

WORK = {"bf16": "fp32", "fp16": "fp32", "fp32": "fp32", "fp64": "fp64"}
#: (channels, groups, reduction, sides of the map) of the modules the models hold, at 224 px
MODULES = ([(c, 4, 16, s) for c, s in ((64, 56), (128, 28), (256, 14), (512, 7))]  # resnet18
           + [(c, 32, 2, s) for c, s in ((64, 56), (512, 7))]  # resnet18_lgam_g32
           + [(c, 4, 16, s) for c, s in ((160, 32), (640, 8))]  # WRN-16-10 (CIFAR)
           + [(c, 4, 16, s) for c, s in ((256, 32), (1024, 8))])  # ResNeXt-29 (CIFAR)


def map_variants(quick: bool) -> list[tuple[str, dict, dict, int]]:
    """(kernel, signature, constexprs, num_warps) of the forward and backward map kernels."""
    out = []
    seen = set()
    for c, g, _, side in MODULES[:4] + MODULES[5:6] if quick else MODULES:
        block_p, width, warps = T._map_blocks(c // g, side * side)
        combos = ([("bf16", True, True), ("fp32", False, False)] if quick else
                  [(d, rows, res) for d in WORK for rows in (True, False) for res in (True, False)])
        for dtype, rows, res in combos:
            key = (block_p, width, dtype, rows, res)
            if key in seen:
                continue
            seen.add(key)
            m, w = f"*{dtype}", f"*{WORK[dtype]}"
            ints = {n: "i32" for n in ("C", "Cg", "G", "P")}
            ints.update({"sp": "constexpr", "sc": "i32"} if not rows else {"sp": "i32", "sc": "constexpr"})
            one = {"sp": 1} if not rows else {"sc": 1}  # Triton specialises an int argument equal to 1
            consts = {"RES": res, "BLOCK_P": block_p, "BLOCK_W": width, **one}
            fwd = {"x": m, "identity": m, "p": w, "q": w, "v": w, "out": m, "s_out": w, **ints,
                   "RES": "constexpr", "BLOCK_P": "constexpr", "BLOCK_W": "constexpr"}
            bwd = {"x": m, "g_in": m, "y": m, "p": w, "q": w, "v": w, "s": w, "dx": m, "d_identity": m, "dl": w,
                   **ints, "blocks": "i32", "RES": "constexpr", "BLOCK_P": "constexpr", "BLOCK_W": "constexpr"}
            out += [("_forward_kernel", fwd, consts, warps), ("_backward_kernel", bwd, consts, warps)]
    return out


def scales_variants(quick: bool) -> list[tuple[str, dict, dict, int]]:
    """The eval, train and train-backward scales kernels, at batches 1 (eval), 2 and 256."""
    out = []
    seen = set()
    for c, g, r, _ in MODULES[:4] + MODULES[5:6] if quick else MODULES:
        cg = c // g
        hidden = max(cg // r, 1)
        for w in (("fp32",) if quick else ("fp32", "fp64")):
            p = f"*{w}"
            common = {"pooled": p, "table": "*i64", "consts": p, "scales": p, "p_out": p, "q_out": p, "v_out": p}
            ints = {"B": "i32", "G": "i32", "Cg": "i32", "H": "i32"}
            for batch in (1, 256):
                block, width, warps = T._eval_blocks(batch, cg)
                if ("eval", block, width, w) not in seen:
                    seen.add(("eval", block, width, w))
                    out.append(("_scales_kernel", {**common, **ints, "BLOCK_B": "constexpr", "BLOCK_W": "constexpr"},
                                {"BLOCK_B": block, "BLOCK_W": width}, warps))
            for batch in (2, 256):
                chunk, width = T._chunk(batch, cg)
                key = ("train", chunk, width, T._pow2(hidden), w)
                if key in seen:
                    continue
                seen.add(key)
                out.append(("_scales_train_kernel", {**common, "saved": p, **ints, "CHUNK": "constexpr",
                                                     "BLOCK_W": "constexpr"}, {"CHUNK": chunk, "BLOCK_W": width},
                            T._warps(chunk * width)))
                bwd = {"d_scales": p, "scales": p, "table": "*i64", "saved": p, "d_pooled": p, "grads": p, **ints,
                       "CHUNK": "constexpr", "BLOCK_W": "constexpr", "BLOCK_H": "constexpr"}
                out.append(("_scales_backward_kernel", bwd, {"CHUNK": chunk, "BLOCK_W": width,
                                                             "BLOCK_H": T._pow2(hidden)},
                            T._backward_warps(chunk, width, hidden)))
    return out


def usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, ... of a cubin's kernel, from ``cuobjdump --dump-resource-usage``."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    line = next(line for line in text.splitlines() if "REG:" in line)
    return {k: int(v) for k, v in (item.split(":")[:2] for item in line.split() if ":" in item and item.split(":")[1].isdigit())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80: A100, 90: H100/H200)")
    p.add_argument("--quick", action="store_true", help="a few variants (the tests' run)")
    p.add_argument("--max-stack", type=int, default=64, help="most bytes of spills per thread to accept")
    args = p.parse_args()
    if T.triton_missing():
        print(f"skipped: {T.triton_missing()}")
        return 0
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        print("skipped: this Triton has no NVIDIA backend (ptxas)")
        return 0
    variants = scales_variants(args.quick) + map_variants(args.quick)
    print(f"Triton {triton.__version__}; {len(variants)} kernel variants x sm_{', sm_'.join(map(str, args.arch))}\n")
    print("| kernel | arch | dtypes | constexprs | warps | registers | spills (B) | shared (B) |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    bad = 0
    for name, signature, consts, warps in variants:
        dtypes = ",".join(sorted({t[1:] for t in signature.values() if t.startswith("*") and t != "*i64"}))
        shown = " ".join(f"{k}={v}" for k, v in consts.items())
        for arch in args.arch:
            try:
                kernel = triton.compile(ASTSource(fn=getattr(T, name), signature=signature, constexprs=consts),
                                        target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
                res = usage(kernel.asm["cubin"])
            except Exception as e:  # noqa: BLE001 - every failure is reported, then counted
                bad += 1
                print(f"| {name} | sm_{arch} | {dtypes} | {shown} | {warps} | FAILED: {type(e).__name__}: "
                      f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''} | | |")
                continue
            spills = res.get("STACK", 0)
            bad += spills > args.max_stack
            print(f"| {name} | sm_{arch} | {dtypes} | {shown} | {warps} | {res.get('REG')} | {spills} | {res.get('SHARED')} |")
    print(f"\n{bad} failed or spilled more than {args.max_stack} B" if bad else "\nall compiled, none spilling")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
