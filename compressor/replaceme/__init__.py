"""ReplaceMe: training-free depth pruning with one linear map (Shopkhoev et al., 2025, arXiv 2505.02819).

n consecutive blocks s … s+n−1 are removed and replaced by a linear map T that is folded into the MLP output
projection of the last kept block i = s−1, so the pruned model is an ordinary, smaller checkpoint.

* Cut selection (:mod:`~compressor.replaceme.walk`): d(s) = mean over calibration sequences of
  arccos(cos(h_{s−1}, h_{s+n−1}))/π on one vector per sequence: the last non-padded token (causal LMs, as in
  the paper) or the mean over its tokens (encoders, whose sentence embedding is that mean; ``distance_tokens``
  chooses). s ∈ {1 … L−n}: block 0 is never removed. The states are the real block outputs (before the final
  norm), so cutting up to the last block is allowed.
* Estimation (:mod:`~compressor.replaceme.estimators`), per non-padded token t: x = m_i (out-projection output
  of block i), a = z_i − m_i (block i's residual stream without m), target h = h_{s+n−1}.
  Pre-norm blocks (LLaMA, GPT-2): z_i = h_i and the kept block computes a + m T, so y = h − a.
  Post-norm blocks (BERT): block i outputs LN(a + m T), the LayerNorm sits *after* the residual add, so no T can
  act on the block output itself. T still goes into the out projection; the LS target is the LN pre-image of h
  at the scale of the original sum: z* = μ(z_i) + σ(z_i)·norm((h − β)/γ), y = z* − a, so LN(a + m T) ≈ LN(z*)
  = h exactly when (h − β)/γ is itself normalised (and approximately otherwise). `cosine_loss: output` optimises
  cos(LN(a + m T), h) directly, through the norm (:mod:`~compressor.replaceme.structure`).
  LS: G = Σ xᵀx, B = Σ xᵀy in float64, T = (G + αI)⁻¹B. Cosine: Adam on 1 − cos(x T, y) (or the output form),
  mini-batches of 1024 tokens, 10 epochs, lr 1e-4, T initialised to the identity (the paper's settings).
* Folding (:mod:`~compressor.replaceme.prune`): out projection W ← TᵀW (nn.Linear; W ← W T for HF Conv1D),
  b ← b T, in float64. The folded block is checked against the unfolded one (out projection followed by an
  explicit T) on calibration data. Then the blocks are deleted, layer_idx renumbered and the config updated
  (see compressor.blocks).
* Calibration memory (:mod:`~compressor.replaceme.memory`): each batch goes through the blocks on its own, so
  one batch's hidden states and block inputs (masks, rotary tables) are alive at a time, beside the
  per-sequence pooled states for the distances and the float64 statistics. Never all hidden states of all
  layers (`output_hidden_states`). The cosine estimator also keeps its tokens (x, y), as the reference code does.
  ``memory.stage_bytes`` is the recipe stage's up-front estimate.
* Baselines and quality (:mod:`~compressor.replaceme.quality`, :func:`naive_drop`): how the pruned model
  compares with the dense one.
"""

from __future__ import annotations

from compressor.replaceme.calibration import Calibration, make_calibration
from compressor.replaceme.estimators import collect_statistics, solve_cosine, solve_ls
from compressor.replaceme.memory import PeakMemory
from compressor.replaceme.prune import Estimator, ReplaceMeOptions, naive_drop, prune
from compressor.replaceme.quality import count_params, dense_reference, quality
from compressor.replaceme.structure import check_structure
from compressor.replaceme.walk import angular_distance, block_distances

__all__ = [
    "Calibration", "make_calibration", "PeakMemory", "block_distances", "angular_distance", "check_structure",
    "collect_statistics", "solve_ls", "solve_cosine", "Estimator", "ReplaceMeOptions", "prune", "naive_drop",
    "count_params", "dense_reference", "quality",
]
