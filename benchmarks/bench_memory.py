"""Peak memory of training, in bytes per parameter: fp32 AdamW against mixprec's lean modes.

Each mode runs in a process of its own (peak RSS is a high-water mark per process): build a
stack of ``Linear(1024, 1024)`` layers of about ``--millions`` parameters, take 3 AdamW steps
on a small batch (activations are negligible here: what is measured is model state), and report
``(peak RSS - RSS before the model was built) / parameters``, the start taken after a tiny run of
the same mode has loaded every module and kernel it uses. The parameters of 16-bit modes are
created in bf16 (no fp32 copy ever exists). The children run with
``MALLOC_MMAP_THRESHOLD_=131072``: glibc's default raises its mmap threshold after the first
free of a large block, and from then on the freed per-layer temporaries of backward and the step
(fp32 gradients, chunk scratch, a few MiB each) stay in the heap between the long-lived tensors,
which measures the allocator, not what the process holds (``--glibc-default`` keeps it: about 4
B/param more for every mode at 17M parameters). Modes:

* ``torch-fp32``: torch's AdamW on fp32 parameters, the plain loop (no mixprec);
* ``bf16-mixed``: fp32 parameters, bf16 compute (``MixedPrecision("bf16-mixed")``);
* ``bf16-pure``: bf16 parameters, stochastic rounding, fp32 states;
* ``bf16-pure+inbw``: the same with ``step_in_backward=True`` (no gradient buffer);
* ``master16``: bf16 parameters with exact compressed fp32 masters (``master_remainder=16``);
* ``master16+int8`` / ``master16+int8+inbw``: the same with int8 optimizer states, and with the
  step inside backward (issue 21's target: <= 7 B/param; a gradient buffer alone makes the first
  8.04 B/param of model state, so the target needs the step in backward);
* ``lean`` / ``lean+inbw``: bf16 parameters, stochastic rounding, int8 states (the
  ``bf16-lean`` preset where the policy has it; otherwise the same wrapper, built here), and with
  the step inside backward (issue 21's target: <= 5 B/param).

Measured (25.2M parameters: 24 x Linear(1024, 1024); Intel Xeon with AVX512-BF16, 2 cores shared
with other jobs at load average 3-6, so the seconds are not comparable; torch 2.13 CPU),
``--millions 25``:

    mode                      params   B/param   s (3 steps)
    torch-fp32            25,190,400     16.39           6.7
    bf16-mixed            25,190,400     16.41          21.1
    bf16-pure             25,190,400     12.28           4.3
    bf16-pure+inbw        25,190,400     10.37          22.8
    master16              25,190,400     14.67          46.8
    master16+int8         25,190,400      8.68          64.3
    master16+int8+inbw    25,190,400      6.74          53.5
    lean                  25,190,400      6.27          23.8
    lean+inbw             25,190,400      4.40          48.8

The model state alone (``memory_report``) is 2 B/param of weights plus: 2 (grads) + 8 (fp32
states) for bf16-pure, 8 with the step inside backward; 2 + 2 (remainder) + 8 for master16;
2 + 2 + 2.04 (int8 states) for master16+int8, 2 + 2.04 in backward; 2 + 2.04 for lean, 2.04 in
backward. The rest is transient (a layer's gradient, the one-pass kernel's per-chunk scratch)
and does not grow with the model. At 201M parameters (192 layers), the issue's targets
(``--millions 201 --modes lean+inbw,master16+int8+inbw,master16+int8``; load average about 1.5):

    mode                      params   B/param   s (3 steps)
    lean+inbw            201,523,200      4.21          22.4
    master16+int8+inbw   201,523,200      6.23          21.8
    master16+int8        201,523,200      8.19          62.6

    python benchmarks/bench_memory.py [--millions 201] [--modes torch-fp32,bf16-pure,...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MODES = (
    "torch-fp32",
    "bf16-mixed",
    "bf16-pure",
    "bf16-pure+inbw",
    "master16",
    "master16+int8",
    "master16+int8+inbw",
    "lean",
    "lean+inbw",
)
STEPS = 3
BATCH = 8
# 1M-parameter layers: the step's transient fp32 buffers (decoded states, chunk scratch) are per
# tensor, so layers this size keep them a small part of the model whatever its size.
WIDTH = 1024


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _session(mode: str):
    from mixprec.session import MixedPrecision

    base = mode.removesuffix("+inbw")
    common = {"backend": "emulated", "step_in_backward": mode.endswith("+inbw")}
    if base == "bf16-mixed":
        return MixedPrecision("bf16-mixed", "cpu", **common)
    if base == "bf16-pure":
        return MixedPrecision("bf16-pure", "cpu", update="stochastic", **common)
    if base == "lean":
        return MixedPrecision("bf16-lean", "cpu", **common)
    state = ",s=int8" if base == "master16+int8" else ""
    return MixedPrecision(f"p=bf16,master=fp32{state}", "cpu", master_remainder=16, **common)


def _train(mode: str, millions: float, width: int) -> tuple[int, float]:
    """Build the model and take the steps; (parameters, seconds)."""
    import torch
    from torch import nn

    layers = max(1, round(millions * 1e6 / (width * width + width)))
    dtype = torch.float32 if mode in ("torch-fp32", "bf16-mixed") else torch.bfloat16
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(width, width, dtype=dtype) for _ in range(layers)))
    n = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(BATCH, width)
    began = time.perf_counter()
    if mode == "torch-fp32":
        for _ in range(STEPS):
            model(x).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    else:
        mp = _session(mode)
        model, optimizer = mp.prepare(model, optimizer)
        for _ in range(STEPS):
            loss = model(x.to(dtype)).float().pow(2).mean()
            mp.backward(loss)
            assert mp.step(optimizer).stepped
            optimizer.zero_grad()
    return n, time.perf_counter() - began


def run_mode(mode: str, millions: float, threads: int) -> dict[str, float]:
    """One mode, in this process: 3 AdamW steps; bytes per parameter above the start (taken
    after a tiny run of the same mode has loaded every module and kernel it uses)."""
    import torch

    torch.set_num_threads(threads)
    _train(mode, 0.01, 64)
    start = _rss_bytes()
    n, seconds = _train(mode, millions, WIDTH)
    return {
        "mode": mode,
        "params": n,
        "bytes_per_param": (_peak_bytes() - start) / n,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--millions", type=float, default=201.0, help="parameters (%(default)s M)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--glibc-default",
        action="store_true",
        help="leave glibc's dynamic mmap threshold on (freed per-layer buffers stay in the heap)",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_mode(args.child, args.millions, args.threads)))
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown!r}; valid: {', '.join(MODES)}")
    print(f"{'mode':18}{'params':>14}{'B/param':>10}{'s (3 steps)':>14}")
    for mode in modes:
        command = [sys.executable, __file__, "--child", mode, "--millions", str(args.millions)]
        command += ["--threads", str(args.threads)]
        env = dict(os.environ)
        if not args.glibc_default:
            env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            print(f"{mode:18} failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"{mode:18}{row['params']:>14,}{row['bytes_per_param']:>10.2f}{row['seconds']:>14.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
