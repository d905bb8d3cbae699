"""Where a ptune training step's time goes: XLA ops ranked by time, from a JAX profiler trace.

    python benchmarks/profile_step.py [--shape gpt2 --method full --dtype float32 --remat none --steps 3
                                       --top 25]

The step is benchmarks/vs_peft.py's (same shape, batch, method settings and AdamW). It is
compiled (time printed), run twice, then traced for --steps steps. Each op the XLA runtime ran
(a "thunk": a matmul, a fusion, a copy, ...) is matched to its line of the optimized HLO, which
gives its kind: `matmul` (a dot, or a fusion with one), `reduce`, `scatter/gather`,
`copy/transpose`, `elementwise` (other fusions), `other`. Prints time per step by kind and the
--top ops with their HLO. Loops (`while`, the LM loss's chunk scan) are containers: their body
ops are counted, not the loop itself. Thunks may overlap on the two cores, so the kinds can add
up to more than the step.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vs_peft  # noqa: E402  (the benchmark's step: one definition of the measured work)

from ptune import cli  # noqa: E402

cli.set_xla_flags()   # as the launchers, before JAX starts

INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
CONTAINERS = {"while", "conditional", "call"}


def hlo_instructions(text: str) -> tuple[dict, dict]:
    """({instruction name: (opcode, result type, rest of line)}, {computation name: its text})."""
    instructions, computations, current = {}, collections.defaultdict(list), None
    for line in text.splitlines():
        if not line.startswith(" ") and "{" in line and not line.startswith("HloModule"):
            current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
        elif current and (m := INSTRUCTION.match(line)):
            instructions[m[1]] = (m[3], m[2], m[4])
            computations[current].append(line)
    return instructions, {name: "\n".join(lines) for name, lines in computations.items()}


def kind(opcode: str, rest: str, computations: dict) -> str:
    body = computations.get(m[1], "") if (m := re.search(r"calls=%?([\w.\-]+)", rest)) else ""
    if opcode in ("dot", "convolution") or " dot(" in body or " convolution(" in body:
        return "matmul"
    if opcode in ("scatter", "gather") or " scatter(" in body or " gather(" in body:
        return "scatter/gather"
    if opcode in ("reduce", "reduce-window") or " reduce(" in body:
        return "reduce"
    if opcode in ("copy", "transpose") or (body and all(
            op in ("parameter", "copy", "transpose", "bitcast", "reshape")
            for op in re.findall(r"= \S+ ([a-z][\w\-]*)\(", body))):
        return "copy/transpose"
    return "elementwise" if opcode == "fusion" else "other"


def thunk_times(trace_dir: str) -> collections.Counter:
    """Microseconds per HLO op over the whole trace, from the runtime's thunk events."""
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    times = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "hlo_op" in e.get("args", {}):
            times[e["args"]["hlo_op"]] += e["dur"]
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="gpt2", choices=vs_peft.SHAPES)
    ap.add_argument("--method", default="full", choices=vs_peft.METHODS)
    ap.add_argument("--dtype", default="float32", choices=vs_peft.DTYPES)
    from ptune.models.model_config import REMAT
    ap.add_argument("--remat", default="none", choices=REMAT, help="the step's model.remat policy")
    ap.add_argument("--steps", type=int, default=3, help="traced steps (after 2 untraced)")
    ap.add_argument("--top", type=int, default=25, help="how many of the slowest ops to list")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    import jax

    _, step, _, one, compile_s = vs_peft.ptune_step(args.shape, args.method, args.dtype, args.remat)
    for _ in range(2):
        one()
    with tempfile.TemporaryDirectory() as trace_dir:
        t0 = time.perf_counter()
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.steps):
                one()
        wall = (time.perf_counter() - t0) / args.steps
        times = thunk_times(trace_dir)
    instructions, computations = hlo_instructions(step.as_text())
    unmatched = sorted(set(times) - set(instructions))
    per_kind, ops = collections.Counter(), []
    for name, us in times.items():
        opcode, result, rest = instructions.get(name, ("?", "?", ""))
        if opcode in CONTAINERS:
            continue
        k = kind(opcode, rest, computations)
        per_kind[k] += us / args.steps / 1e6
        ops.append((us / args.steps / 1e6, k, name, opcode, result))
    print(f"{args.shape} {args.method} {args.dtype}, remat {args.remat}, batch {vs_peft.BATCH} x {vs_peft.LENGTH}: "
          f"compile {compile_s:.1f} s, step {wall:.2f} s (traced, mean of {args.steps}); ops' time per step by kind:")
    print("| kind | s per step | % of step |\n|---|---:|---:|")
    for k, s in per_kind.most_common():
        print(f"| {k} | {s:.3f} | {s / wall:.0%} |")
    print(f"\nslowest {args.top} ops:\n| s per step | kind | op | opcode | result |\n|---:|---|---|---|---|")
    for s, k, name, opcode, result in sorted(ops, reverse=True)[:args.top]:
        print(f"| {s:.3f} | {k} | {name} | {opcode} | {result[:60]} |")
    if unmatched:
        print(f"\n{len(unmatched)} traced op(s) not in the optimized HLO (kind 'other'): {unmatched[:10]}")


if __name__ == "__main__":
    main()
