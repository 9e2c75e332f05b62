"""Training-step time of emulated 16-bit, FP8 and 4-bit sessions vs FP32, in one process.

Models: the charlm-shaped transformer of issue 22 (TinyTransformer, d_model 256, 4 layers,
4 heads, seq 128, batch 16, AdamW) and the small ``cnn`` and ``digits`` tasks (their cost is
the fixed cost per op and per region). Each preset runs through a :class:`mixprec.MixedPrecision`
session with ``backend="emulated"`` (on a CPU with 16-bit units too); the variants are timed in
rotation, and the median of the per-round ratios to fp32 is reported, so a machine shared with
other work swings both sides alike. CPU flags and the load average are printed.

Targets (issue 22): transformer emulated bf16 <= 1.2x, fp8-mixed <= 1.5x, nvfp4-mixed <= 1.7x;
cnn and digits <= 1.3x.

    python benchmarks/bench_emulation.py [--threads 1] [--rounds 7] [--models transformer,cnn]
        [--clock cpu]   # the thread's CPU time: steadier where other processes share the cores
        [--isa avx2]    # as on an AVX2-only CPU, on an AVX-512 one
        [--saved]       # what one forward keeps for backward, not the time
    python benchmarks/bench_emulation.py --breakdown --models digits,cnn --clock cpu --rounds 101
    python benchmarks/bench_emulation.py --profile fp8-mixed   # where the time goes
    python benchmarks/bench_emulation.py --models digits --clock cpu --rounds 301 --phases

Where the time goes (torch.profiler, transformer, fp8-mixed, 1 thread, Xeon with AVX512-BF16 and
AMX, shared machine at load 5-15; share of self CPU time):

* before: ``mm`` 31%; quantizing the operands 43% (``copy_`` 19%: widening bf16 operands, the
  fp32 -> fp8 cast, which CPUs do not vectorize, and widening bit patterns; ``index_select``
  11%: decoding fp8 through a table; ``mul`` 7% and ``clamp_`` 3%: the scaling; ``aminmax`` 4%).
* after (``compute/_emulate.cpp``: amax, scale, saturating rounding onto the fp8 grid and
  division by the scale in one kernel call per operand, two passes over it, no fp8 tensor):
  ``mm`` 42%, the kernel 15%, ``copy_`` 9% (the output roundings and the casts of the bf16 region
  around the FP8 layers). Step time / fp32 (thread CPU time, medians): fp8-mixed 2.06x -> 1.33x,
  bf16-mixed 1.25x -> 1.20-1.22x.
* small models (digits, cnn): the cost is per op, not arithmetic; each emulated GEMM and its
  backward run ~10 small torch ops (widen, GEMM, round) where fp32 runs 3, plus the session's
  per-step work (loss scaler, found-inf check). The autocast kernels walked every op's arguments
  with pytree (now directly); digits fp8-mixed 3.4x -> 2.5x, bf16-mixed ~2.0x (unchanged).

Small models, the fixed cost per op (same Xeon, 2 cores shared with two other jobs: load average
3.0-4.4 during these runs; ``--models cnn,digits --clock cpu --threads 1 --rounds 21``, the old
and the new tree alternated). Per step, digits bf16-mixed (cnn in brackets), from torch.profiler
and cProfile (which inflates Python time):

* before: 533 ATen ops (720); 0.49 ms (0.75) of Python in ``mixprec.compute``. An emulated linear
  ran: the autocast kernel for ``linear`` (casts), a redispatch, torch's decomposition, the
  ``addmm`` kernel again, then the ``torch.library`` custom op's per-call machinery (wrapper,
  generated autograd kernel, redispatch, backend wrapper: about 40 us a call, more than a
  64x256x256 GEMM) around five small ops; its backward a Python function of eight ops, whose
  weight gradient came out row-major, so autograd copied it transposed into ``.grad`` (40-150 us
  for 256x256 on this loaded machine). fp8-mixed: the fake-quantize kernel 0.17 ms/step on digits
  (0.03 on cnn), and about 10 us of Python per operand working out its block, format and rule.
* after: on plain eager tensors (no dispatch or function mode, no functorch, not compiling;
  elsewhere the custom ops run as before) ``mm``, ``addmm`` and ``convolution`` are one C++
  autograd node each (``compute/emulated_cpp.py``, ``_emulate.cpp``: the same ATen ops, so the
  same bits; a double backward records them), the other emulated ops and the fp8 GEMMs run their
  op's own forward and backward under a plain ``autograd.Function`` (``compute/_eager.py``);
  ``linear`` and ``conv1d/2d/3d`` go straight from their autocast kernel to that node (torch's own
  decomposition, no redispatch); each kernel works out its plan once per region configuration;
  gradients are laid out as torch's fp32 backward lays them out (no transposing copy); an fp8
  operand's kernel arguments are worked out once per recipe, role and shape. Same 529 ATen ops
  (718); 0.11 ms (0.17) of Python in ``mixprec.compute``; the fake-quantize kernel unchanged.
* step / fp32, before -> after (two alternated pairs; two earlier pairs, before the last fp8 and
  C++-node changes, agree): cnn bf16-mixed 1.75, 1.80 -> 1.45, 1.43; fp16-mixed 1.83, 1.89 ->
  1.51, 1.55; fp8-mixed 1.80, 1.88 -> 1.51, 1.52. digits bf16-mixed 2.02, 2.07 -> 1.52, 1.58;
  fp16-mixed 2.06, 2.09 -> 1.61, 1.66; fp8-mixed 2.29, 2.22 -> 1.81, 1.93. transformer (7 rounds,
  once each): bf16 1.23 -> 1.19, fp16 1.19 -> 1.14, fp8 1.33 -> 1.23. The 1.3x target is not met.
* where the rest goes: digits bf16-mixed, 300 interleaved steps against fp32 (ratios): the same
  casts, widenings and roundings as plain torch ops in the model (autograd keeps the widened
  copies, so its backward widens nothing again), no region, no session ("the floor": about what
  the passes themselves cost) 1.20; the model in a ``mixprec.autocast`` emulated
  region with a plain optimizer 1.75 before, 1.40 after; through the session (``prepare``,
  ``backward``, ``step``) 2.01 before, 1.64 after. So of the 0.64 left, about 0.20 are the passes
  (seven elementwise passes per linear forward, about eight backward), 0.20 the region (autocast
  kernels in Python, region entry, an autograd node per cast) and 0.24 the session: its step
  (unscale and found-inf check, scale update, per-step checks; more for fp16's dynamic scale)
  and the prepared model's forward hooks (cnn: also its BatchNorm islands). Tried and dropped:
  the casts of weight and bias folded into the GEMM's autograd node (no measurable gain, and a
  double backward would add the weight's two second-order contributions in fp32 where autocast
  adds them in 16 bits).

NVFP4 (transformer, nvfp4-mixed vs fp32, 1 thread, ``--clock cpu``; 2-vCPU Xeon with AVX512-BF16
and AMX, shared with two other jobs; ``/proc/loadavg`` around each run):

* before: the block fake-quantize of ``blockscaled.py`` took ~15 elementwise torch passes per
  operand (abs, amax, the scale's shifts and clamps, the rounding's compares, rounds and
  copysign), the weight-gradient GEMM's transposed operands were copied first, and
  ``torch.rand`` drew stochastic rounding's numbers one engine call at a time; ``mm`` was under
  10% of the step. nvfp4-mixed 2310.86 ms, fp32 332.86 ms: 6.86x (load 2.64 -> 2.82).
* after (``_blockscaled.cpp``: amax, scale, rounding and dequantization in one kernel call per
  operand, bit for bit the torch path, which stays the fallback; NVFP4's tensor scale from the
  blocks' amaxes, two passes over an operand; transposed operands read as they lie; bf16
  operands widened on reading; the draws made in the kernel by ``at::mt19937``'s own steps on
  torch's generator, the same numbers): ``mm`` 36%, the kernel 26%, ``copy_`` 9%, ``bmm`` 6%.
  nvfp4-mixed 577.56 ms, fp32 347.88 ms: 1.68x (7 rounds, load 2.02 -> 2.01; 1.69x in another
  run at load 2.0, 1.78-1.86x at load 3.5-4.5 before the last two changes).

The session's own per-step cost (``mp.backward``, ``mp.step``, the forward hooks; same Xeon,
load 1.6-2.5, thread CPU time, 400 interleaved steps per variant, ratios to fp32). Against the
same prepared model stepped by hand, ``mp.step`` added (old -> new): digits bf16-mixed 0.21 ->
0.16, fp16-mixed 0.30 -> 0.18; cnn bf16-mixed 0.16 -> 0.11, fp16-mixed 0.19 -> 0.13.
``mp.backward`` over ``loss.backward`` adds 0.01-0.05 (fp16's loss multiply) and the forward
hooks about nothing against a ``with mp.autocast():`` region (within 0.01). Where ``mp.step``'s
time went (perf_counter around its parts inside the loop, digits, us, bf16/fp16): the check
that the optimizer's parameters are still the model's (a walk over ``model.parameters()``) 33;
the unscale and found-inf decision 90 (one foreach kernel over the gradients about 20,
gathering them 10, the rest the scaler's per-optimizer records and ~8 0-dim tensor ops); the
scale update 48/136 (fp16: the dynamic rule as ~15 0-dim ops); the report 10. Parts run about
3x slower inside the loop than timed alone (caches cold after the backward), so it is the count
of calls and small ops that costs, not their size; garbage collection is negligible (0.01 gen-0
collections a step). Cut, bit for bit the same: the default dynamic rule (hysteresis 1, no
``max_scale``, the scale's lower bound a back-off clear of the floor) runs as one
``torch._amp_update_scale_`` (update 136 -> 62 us); the no-scaling rule writes its scale in one
op (48 -> 36); one optimizer's single found-inf flag is not re-stacked; the ownership check
keeps the module and parameter slots the walk found and walks again only when one changed
(``session/owned.py``; 33 -> 20). This command (21 rounds, old/new alternated twice): cnn
bf16-mixed 1.42, 1.41 -> 1.41, 1.41; fp16-mixed 1.49, 1.48 -> 1.46, 1.44; digits bf16-mixed
1.51, 1.64 -> 1.48, 1.55; fp16-mixed 1.63, 1.67 -> 1.55, 1.58 (fp8 and nvfp4 unchanged within
noise). Left: the unscale-and-decide bookkeeping (~60 us in the loop) kept for torch's
``_per_optimizer_states`` layout, multi-optimizer decisions and the process-group agreement.

Small models, the next round (same Xeon, another job on the second core, load average 0.7-2.7;
thread CPU time, 1 thread; per step, ratios to fp32, medians). Where the time went, digits
bf16-mixed: its ops as plain torch ops (widen, GEMM node, round; "the floor") 1.26x, the model
in an emulated ``mixprec.autocast`` region 1.39x, the session 1.60x. In the region each linear
layer's autocast kernel ran in Python (the dispatcher's boxed call, the plan, the shortcut's
checks, the GEMM op's call back into C++): ~22 us a call, forward only; inside the emulated GEMMs
each widening and rounding was four dispatcher ops (``to``, ``_to_copy``, ``empty_strided``,
``copy_``). ``mp.step`` added ~0.12 over ``optimizer.step()``, the forward hooks ~0.06.

* ``linear`` and ``conv1d/2d/3d`` have their autocast kernel in C++ (``_emulate_autocast.cpp``):
  in an emulated region, on plain eager tensors, it casts the operands (torch's own cast where
  autograd records it) and calls the GEMM's C++ autograd node; anything else goes on to the
  Python kernel. A ``linear`` call in a region: 122 -> 96 us (64x256 by 256x256, forward).
* inside the emulated GEMMs, widening and rounding are one loop each (bf16 to nearest even as
  torch rounds; fp16 with F16C/AVX-512's conversion, as torch's).
* ``mp.step`` ends its iteration in one scaler call (``GradScaler.step_and_update``), the
  forward hooks find their region by identity, ``mp.backward`` arms its hooks with plain calls.
* tried and dropped: a C++ autograd node for autocast's casts (no faster than torch's cast, and
  tools take torch's ``ToCopyBackward0`` for a weight copy); folding the weight's cast into the
  GEMM's node, which would save two of the four passes over each weight per step but make a
  double backward sum a weight's second-order contributions in fp32 where autocast sums them in
  16 bits (taken two rounds later, with those terms: the last paragraph).
* step / fp32, before -> after (``--breakdown``: floor, region, session): digits 1.26, 1.39, 1.60
  -> 1.25, 1.29, 1.46; cnn (no floor) region 1.20 -> 1.11, session 1.41 -> 1.29.
  This command (21 rounds): cnn bf16 1.41 -> 1.31, fp16 1.44 -> 1.36, fp8 1.50 -> 1.44; digits
  bf16 1.52 -> 1.39, fp16 1.55 -> 1.45, fp8 1.81 -> 1.78.
* what is left on digits: ~0.25 are the passes autocast's graph itself makes (each 256x256
  weight is rounded, widened for the GEMM, widened again for the input gradient, its gradient
  rounded and widened: 6-10 us a pass, where fp32 has none; fp32's whole step is 1.2 ms, 0.5 of
  it AdamW's small ops), ~0.10 ``mp.step`` (the one-kernel non-finite check, the report, the
  ownership check: Python in a cache the backward left cold), ~0.04 the hooks (torch's module
  call takes its slow path, ~2.4 us, for every hooked module).

NVFP4, the weight-gradient GEMM and stochastic rounding (2026-12-07; same Xeon, cpu flags
amx_bf16, amx_tile, avx2, avx512_bf16, avx512_fp16, avx512f; another job on the second core,
load 1.6-2.2; ``--models transformer --presets fp32,nvfp4-mixed --clock cpu --threads 1 --rounds
7``, the old and the new tree alternated). ``--profile nvfp4-mixed`` (thread CPU time, 3 steps),
before: ``mm`` 36%, the kernel 23%, ``copy_`` 8.6% (with the widened gradient and input of the
weight-gradient GEMM), ``bmm`` 6.1% (its RHT), ``add`` 2.9%; the weight-gradient op 850 of 2322
ms. After: ``mm`` 42%, the kernel 18% (10% functional, 8% in place), the one-pass RHT 7.6%,
``copy_`` 6.3%, no ``bmm``; the weight-gradient op 611 of 1962 ms.

* the RHT of a 16-bit operand in one C++ pass (widen, pad, transform; ``_hadamard.cpp``, summing
  in the order of torch's matmul, the same bits), its output quantized in place (``nvfp4_``,
  ``mx_``); the forward's bias added in place.
* stochastic rounding draws and rounds an operand in pieces of 2**17 draws that stay in cache (a
  transposed operand's in strips of columns, transposed in cache) instead of drawing an
  operand-sized buffer first; the Mersenne Twister's state update vectorized; the same numbers.
* nvfp4-mixed / fp32, four pairs: 1.67, 1.62, 1.67, 1.69 -> 1.51, 1.51, 1.52, 1.57 (e.g. fp32
  443.6 ms, nvfp4-mixed 727.3 -> fp32 417.1, nvfp4-mixed 640.7); ``--isa avx2`` (5 rounds, one
  pair, load 1.1-1.3): 1.62 -> 1.48.

Small models once more (2026-12-07, same Xeon, load 0.6-1.9; thread CPU time, 1 thread). The earlier
note's "~0.25 are autocast's passes over each weight" does not hold: a C++ prototype that folds the
weight's and bias's casts into the GEMM node (the weight rounded once into fp32 storage, its
gradient rounded in place; the same parameters bit for bit after a step) ran the digits step 1.229x
fp32 against 1.234x for the floor, interleaved, and 1.18-1.28x against 1.20-1.23x in runs of its
own. The floor's 0.22 is the GEMMs' own widening and rounding: a digits step in fp32 keeps its
weights, gradients and AdamW states (1.3 MB) in the core's cache, and every 16-bit copy and widened
operand pushes some of them out, which also slows what runs after (an emulated layer costs 41 us
more than fp32 in a warm loop, 100+ in the step). Per-phase medians, interleaved (us): fp32 forward
445, backward 465, AdamW 910; the region 723, 657, 908; the session 820, 672, 1113. The session's
extra 0.16 is many small Python costs, each run in a cache the backward left cold (3-5x its warm
time): in ``mp.step`` the ownership check 18, the found-inf check 83 (its kernel 22, a fresh flag
16, the inverse scale 14, gathering the gradients 12, the record 10), the scale rule 8, closing the
iteration 8, the report ~25; in the forward the hooks of the model's children (2.6 us each warm) and
the region's entry and exit (11 us warm, 40-60 cold). Trying the two cheapest (a constant inverse
without loss scaling, a cheaper flag) saved 14 us of 2270: no single change is worth its risk; a C++
step for the no-scaling case would be the next.

Small models, the FP8 and 4-bit layers (2026-12-07, same Xeon, load 0.5-1.1; thread CPU time,
1 thread). ``--profile fp8-mixed`` on digits: the FP8 layer's Python ``autograd.Function`` had
116 us of self time per forward and 124 per backward (three layers: ~0.7 of a 3.2 ms step), its
fake-quantize kernel 15 us a call. nvfp4-mixed went through torch.library's generated autograd
(~300 us per layer call, forward and backward).

* a dynamically scaled emulated FP8 layer on the CPU is one C++ autograd node
  (``fp8_linear_autograd``: the six operands' kernel plans worked out once per recipe and shape
  in Python, then the same kernel calls and ATen ops as the op's Python function, the same bits);
  delayed scales, ``amax_reduce``, high-precision GEMMs and empty batches keep the Python path.
* the 4-bit layer's eager calls go through ``mixprec.compute._eager`` as FP8's do.
* a prepared model's stateless children (activations, pooling) get no forward hooks.
* step / fp32, ``--rounds 101``: cnn fp8 1.49 -> 1.30; digits fp8 1.84 -> 1.60, nvfp4 2.23 ->
  1.98, bf16 1.42 -> 1.41 (``--isa avx2``: digits fp8 1.70 -> 1.61, nvfp4 2.33 -> 2.00).
* what is left, digits bf16 (interleaved, us, the session's step against ``optimizer.step()``):
  ~135 in all; taking parts out of a copy of ``mp.step`` one at a time saved: the loss scaler's
  found-inf check and records against a bare foreach check ~50, the report ~18, the ownership
  and has-work checks ~2 each; no single part is worth a second code path. cnn's session adds
  ~0.1 over its region for the policy's fp32 BatchNorm islands (their fp32 outputs make the ReLU
  and pooling after them fp32: ``native_batch_norm`` 104 us vs 44, ``clamp_min`` 33 vs 15 per
  forward), numerics the policy chose rather than overhead.
* the scaler's common step (one optimizer, plain gradients, no ranks to agree with) checks the
  gradients as one list and writes the closed iteration once instead of each record as it goes
  (the same state, ``tests/scaling/test_scaling_together.py``): ``mp.step`` 888 -> 841-850 us
  interleaved on digits bf16-mixed; this command, the old and the new tree alternated three
  times (61 rounds): digits bf16 1.41, 1.42, 1.44 -> 1.39, 1.38, 1.39; fp16 1.44, 1.44, 1.47 ->
  1.44, 1.44, 1.41; cnn within its noise. Three runs of 101 rounds after it: cnn 1.29 / 1.32 /
  1.33 / 1.27, digits 1.35 / 1.42 / 1.53 / 1.91 (medians; the runs spread by up to 0.1).
* tried and dropped: the fake-quantize kernel's division by the scale (``r / scale`` per value,
  which ``perf annotate`` seems to put at 64% of the loop). Without any division the kernel
  takes 17 us for a 256x256 fp32 operand against 24 (the bound of any cure); an exact
  replacement (``m / scale`` for the grid's 16 mantissas once per scale, a ``vpermps`` look-up
  and a power-of-two multiply per value, the division only where a result is not a normal
  number) took 30 us: its masks and branch per 16 values cost more than the division saved.

Small models on a 2-core AMD EPYC (Zen 4: AVX512_BF16, no AMX, no AVX512-FP16; 2026-12-07, load
0.4-1.0, thread CPU time, 1 thread). Three runs of 101 rounds: cnn 1.25 / 1.28 / 1.31 / 1.24,
digits 1.27 / 1.32 / 1.46 / 1.87 (bf16 / fp16 / fp8 / nvfp4); ``--isa avx2`` cnn 1.24 / 1.27 /
1.30 / 1.23, digits 1.27 / 1.33 / 1.48 / 1.92. Where a digits bf16-mixed step's extra time goes
(us, medians of 301-801 interleaved steps, fp32 -> bf16-mixed): forward 242 -> 420, backward
418 -> 505, step 416 -> 493.

* forward and backward: one 256x256 linear layer, forward and backward in a warm loop, costs 250
  us in fp32, 322 with 16-bit leaves (the emulated GEMM node's widening and rounding), 353 with
  torch's casts of an fp32 weight and bias around it (``ToCopyBackward0`` twice: ~31 us), 398 in
  a region (its entry and exit ~35 us here, after a backward; 11.7 us warm, torch.autocast's 2.0).
  A prototype that folds the fp32 weight's and bias's casts into the linear node (the same
  bits) ran digits bf16-mixed 1.33 -> 1.24x and fp16-mixed 1.32 -> 1.26x, interleaved against
  this path (forward -37 us, backward -53 us a step); the next round took it (below).
* ``mp.step`` against ``optimizer.step()``: 77-114 us. A bare found-inf check (``zeros``, the
  foreach check-and-unscale, ``item``) before the step costs 34-43 of it: the check writes every
  gradient (times 1 without loss scaling), and torch has no read-only fused check on the CPU
  (``_foreach_norm(inf)``: +315 us; ``isfinite`` per tensor: +267). The rest is bookkeeping whose
  parts take 1-5 us each when warm (``_plain_grads`` 5, ownership 3, the flag 1.8, the rule 1-5.5)
  and 3-5x that after a backward; no single part is worth a second code path.
* fp16 vs bf16 on digits: within 0.02-0.06 of each other run to run (the scale update and the
  unscale, ~20 us); casting to fp16 is faster than to bf16 here (w.to 5.9 vs 9.0 us, 256x256).

The parameters' casts folded into the layer's node (``_emulate_fold.cpp``; same AMD EPYC, the
next round, load 0.7-1.1, thread CPU time, 1 thread). The C++ ``linear`` (2-D input) and
``conv1d/2d/3d`` nodes take fp32 weights and biases, round them into fp32 storage inside, save the
weight itself and round its gradient in place: per layer and step, two cast nodes and two passes
over the weight fewer, and no 16-bit weight copy kept. The same bits forward and backward
(``tests/compute/test_eager_path.py``); what else it changes is in ``emulated_cpp``'s note. This
command (``--models cnn,digits --rounds 101``), the tree before and after alternated, three runs
each: cnn bf16 / fp16 1.24-1.25 / 1.28 -> 1.21-1.23 / 1.25, digits 1.24-1.26 / 1.31-1.32 ->
1.19-1.23 / 1.25-1.26 (fp8 and nvfp4, whose layers are their own nodes, within noise: cnn fp8
1.31 -> 1.27-1.30). ``--isa avx2``, two runs each: cnn 1.24-1.27 / 1.27-1.29 -> 1.22 /
1.25-1.27, digits 1.27-1.32 / 1.30-1.35 -> 1.20-1.22 / 1.26-1.28. Earlier, with a neighbour
taking cache (load 1.1), digits 1.29-1.36 / 1.31-1.38 -> 1.24-1.27 / 1.26-1.29 and cnn
1.28-1.32 / 1.29-1.34 -> 1.25-1.26 / 1.26-1.28. ``--breakdown`` after: digits floor 1.16x (the
plain ops with torch's casts, now slower than the region), region 1.09x (was 1.17), session
1.23x (1.32); cnn region 1.06x (1.09), session 1.25x (1.27). ``--phases``, digits (us, fp32 ->
bf16 / fp16): forward 257 -> 401 / 427, backward 435 -> 461 / 469, step 424 -> 518 / 528: the
session's step (found-inf check, scaler) is now the largest part of what is left. The
transformer's linear layers (contiguous 3-D inputs, flattened as torch's linear flattens them)
take the same node: its step is unchanged within noise (``--models transformer --rounds 9``,
alternated twice with the tree before: 1.02-1.03 / 1.04-1.05 / 1.05-1.06 / 1.25-1.26 before,
1.04-1.05 / 1.05-1.06 / 1.06-1.10 / 1.24-1.30 after), and what its forward keeps for backward,
parameters aside, falls from 85.3 to 78.9 MB (bf16-mixed, emulated; batch 16, seq 128): the
16-bit weight copies, 2 bytes per linear weight. ``--saved --models transformer,digits,cnn``
(forward and loss, MB; fp32 / bf16-mixed emulated / torch.autocast bf16): transformer 139.5 /
79.7 / 86.1, digits 0.15 / 0.08 / 0.21 (torch.autocast keeps more than fp32 there: its weight
copies outweigh the activations), cnn 0.50 / 0.51 / 0.29 (the policy's fp32 BatchNorm islands
keep fp32 activations, and the ReLU and pooling after them run in fp32: not this change).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import mixprec
from mixprec import MixedPrecision
from mixprec.app.tasks.cnn import CNNTask
from mixprec.app.tasks.digits import DigitsTask
from mixprec.app.tasks.transformer import TinyTransformer
from mixprec.hardware import probe
from mixprec.policy import PRESETS

VOCAB = 96
_CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock = time.perf_counter
_AVX2_ONLY = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MIXPREC_KERNEL_CFLAGS": "-mno-avx512f",
}
PRESET_NAMES = ("fp32", "bf16-mixed", "fp8-mixed", "nvfp4-mixed")


def _transformer(batch: int = 16, seq: int = 128) -> tuple[Callable[[], torch.nn.Module], tuple]:
    tokens = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(2))

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return TinyTransformer(VOCAB, d_model=256, n_layers=4, n_heads=4, seq_len=seq)

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.reshape(-1, VOCAB).float(), y.reshape(-1))

    return build, (tokens, targets, loss)


def _task(task_cls: type) -> tuple[Callable[[], torch.nn.Module], tuple]:
    task = task_cls()
    x, y = task.batch(0)
    return task.build_model, (x, y, task.loss)


MODELS = {
    "transformer": _transformer,
    "cnn": lambda: _task(CNNTask),
    "digits": lambda: _task(DigitsTask),
}


def make_step(model_name: str, preset: str) -> Callable[[], float]:
    """One timed training step of ``model_name`` under ``preset`` (a session, emulated)."""
    phased = make_phased_step(model_name, preset)
    return lambda: sum(phased())


def make_phased_step(model_name: str, preset: str) -> Callable[[], tuple[float, float, float]]:
    """:func:`make_step`, timed by phase: forward and loss, backward, optimizer step."""
    build, (x, y, loss_fn) = MODELS[model_name]()
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if preset == "fp32":
        backward, step = (lambda loss: loss.backward()), optimizer.step
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mp = MixedPrecision(preset, device="cpu", backend="emulated")
            model, optimizer = mp.prepare(model, optimizer)
        backward, step = mp.backward, (lambda: mp.step(optimizer))

    def phased_step() -> tuple[float, float, float]:
        start = _clock()
        loss = loss_fn(model(x), y)
        forward_done = _clock()
        optimizer.zero_grad(set_to_none=True)
        backward(loss)
        backward_done = _clock()
        step()
        return forward_done - start, backward_done - forward_done, _clock() - backward_done

    return phased_step


def make_breakdown(model_name: str, variant: str) -> Callable[[], float]:
    """One timed bf16 step of ``model_name`` in one of the layers of :data:`BREAKDOWN`."""
    if variant in ("fp32", "session"):
        return make_step(model_name, "fp32" if variant == "fp32" else "bf16-mixed")
    build, (x, y, loss_fn) = MODELS[model_name]()
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if variant == "floor":
        from mixprec.compute.emulated_cpp import engine

        gemm, low = engine("cpu").gemm16_autograd, torch.bfloat16

        def forward(h: torch.Tensor) -> torch.Tensor:
            for layer in model:
                if isinstance(layer, torch.nn.Linear):
                    w, b = layer.weight.to(low).t(), layer.bias.to(low)
                    h = gemm(b, h.to(low), w, 1.0, 1.0)
                else:
                    h = layer(h)
            return h.float()

    else:  # region
        region = mixprec.autocast("cpu", dtype=torch.bfloat16, backend="emulated")

        def forward(h: torch.Tensor) -> torch.Tensor:
            with region:
                return model(h).float()

    return _plain_step(forward, optimizer, (x, y, loss_fn))


def _plain_step(
    forward: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer, data: tuple
) -> Callable[[], float]:
    """A timed step of ``forward`` with a plain ``backward`` and optimizer step (no session)."""
    x, y, loss_fn = data

    def step() -> float:
        start = _clock()
        loss = loss_fn(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return _clock() - start

    return step


BREAKDOWN = {
    "fp32": "the fp32 step",
    "floor": "the model's linear layers as torch's casts around the emulated GEMM's C++ node "
    "(an MLP only: digits)",
    "region": "the model in an emulated mixprec.autocast region, a plain optimizer step",
    "session": "bf16-mixed through the session (prepare, mp.backward, mp.step)",
}
"""``--breakdown``: what a small model's bf16 step costs, layer by layer of mixprec."""


def _print_phases(
    name: str, phased: dict[str, Callable[[], tuple[float, float, float]]], rounds: int
) -> None:
    """Each preset's median forward, backward and optimizer-step time, the presets in rotation."""
    timed = [{p: s() for p, s in phased.items()} for _ in range(rounds)]
    print(f"\n{name}: median time per phase over {rounds} rounds (us)")
    print(f"  {'':12s} {'forward':>9s} {'backward':>9s} {'step':>9s} {'total / fp32':>13s}")
    for p in phased:
        forward, backward, step = (
            statistics.median(r[p][i] for r in timed) * 1e6 for i in (0, 1, 2)
        )
        ratio = statistics.median(sum(r[p]) / sum(r["fp32"]) for r in timed)
        print(f"  {p:12s} {forward:9.0f} {backward:9.0f} {step:9.0f} {ratio:12.2f}x")


def saved_bytes(model_name: str, preset: str) -> int:
    """Bytes that one forward of ``model_name`` and its loss keep for backward, parameters aside
    (each storage once): under ``preset`` through the session, emulated; ``"fp32"`` plain; or
    ``"torch.autocast"``, torch's own bf16 region (native kernels), for reference."""
    build, (x, y, loss_fn) = MODELS[model_name]()
    model = build()
    region: Any = contextlib.nullcontext()
    if preset == "torch.autocast":
        region = torch.autocast("cpu", dtype=torch.bfloat16)
    elif preset != "fp32":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mp = MixedPrecision(preset, device="cpu", backend="emulated")
            model, _ = mp.prepare(model, torch.optim.AdamW(model.parameters()))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), region:
        loss_fn(model(x), y)
    return sum(kept.values())


def profile(model_name: str, preset: str, steps: int, rows: int) -> None:
    """torch.profiler table of ``steps`` steps (after two warm-up steps), by self CPU time."""
    step = make_step(model_name, preset)
    step(), step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7, help="rotations to time")
    parser.add_argument("--models", default="transformer,cnn,digits")
    parser.add_argument("--presets", default=",".join(PRESET_NAMES))
    parser.add_argument(
        "--clock",
        choices=tuple(_CLOCKS),
        default="wall",
        help="wall time, or this thread's CPU time (steadier on a loaded machine, 1 thread)",
    )
    parser.add_argument(
        "--isa",
        choices=("native", "avx2"),
        default="native",
        help="avx2: run as on an AVX2-only CPU (AVX-512 off in ATen, MKL, oneDNN and mixprec's "
        "kernels, which get their own build)",
    )
    parser.add_argument("--profile", metavar="PRESET", help="profile one preset instead")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="time a bf16 step layer by layer instead: "
        + "; ".join(f"{k}: {v}" for k, v in BREAKDOWN.items()),
    )
    parser.add_argument("--rows", type=int, default=30, help="rows of the profile table")
    parser.add_argument(
        "--phases",
        action="store_true",
        help="also print each preset's median forward, backward and optimizer-step time",
    )
    parser.add_argument(
        "--saved",
        action="store_true",
        help="print what one forward keeps for backward (parameters aside) under each preset "
        "and under torch.autocast bf16, instead of timing",
    )
    args = parser.parse_args()
    if args.isa == "avx2" and os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":
        # read when each library starts: set them for a fresh process running this command
        os.environ.update(_AVX2_ONLY)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    global _clock
    _clock = _CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    flags = sorted(probe("cpu", measure=False).cpu_flags)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.clock} clock")
    print(f"cpu flags: {', '.join(flags) or 'none'}")
    print(f"ATen's vector code: {torch.backends.cpu.get_cpu_capability()}")
    if args.isa == "avx2":
        print("as on an AVX2-only CPU: " + ", ".join(f"{k}={v}" for k, v in _AVX2_ONLY.items()))
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.profile:
        for name in args.models.split(","):
            profile(name, args.profile, 3, args.rows)
        return
    presets = [p for p in args.presets.split(",") if p == "fp32" or p in PRESETS]
    skipped = sorted(set(args.presets.split(",")) - set(presets))
    if skipped:
        print(f"presets not in this version (skipped): {', '.join(skipped)}")
    if args.saved:
        for name in args.models.split(","):
            print(f"\n{name}: kept for backward by one forward, parameters aside (MB)")
            for p in (*presets, "torch.autocast"):
                print(f"  {p:14s} {saved_bytes(name, p) / 1e6:9.2f}")
        return
    for name in args.models.split(","):
        if args.breakdown:
            variants = [v for v in BREAKDOWN if v != "floor" or name == "digits"]
            steps = {v: make_breakdown(name, v) for v in variants}
        else:
            phased = {p: make_phased_step(name, p) for p in presets}
            steps = {p: (lambda s=s: sum(s())) for p, s in phased.items()}
        for s in steps.values():  # warm-up (kernel builds, first-call caches)
            s(), s()
        if args.phases and not args.breakdown:
            _print_phases(name, phased, args.rounds)
            continue
        rounds = [{p: s() for p, s in steps.items()} for _ in range(args.rounds)]
        print(f"\n{name}: median step, median ratio to fp32 over {args.rounds} rounds")
        for p in steps:
            ms = statistics.median(r[p] for r in rounds) * 1e3
            ratio = statistics.median(r[p] / r["fp32"] for r in rounds)
            print(f"  {p:12s} {ms:9.2f} ms   {ratio:5.2f}x")
    print(f"\nload average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
