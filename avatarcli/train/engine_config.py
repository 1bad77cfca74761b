"""Settings of the shared training loop (``avatarcli.train.engine``), torch-free so that a stage
config can embed them and ``avatar --help`` can show them without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from avatarcli.stage.config import option, setting


@dataclass
class EngineConfig:
    """Settings of the shared training loop (every trainer embeds these)."""

    # option(): changes the trained weights; setting(): does not (where, how often to log or save).
    # run_dir, seed and device are set by the trainer's stage from its own settings (not offered here).
    run_dir: str = setting("run", cli=False)
    """Folder of checkpoints (``checkpoints/``), TensorBoard logs (``tensorboard/``) and validation grids."""
    steps: int = option(60000, help="Training steps (a resumed run continues up to this).")
    """Total optimisation steps (a resumed run continues up to this)."""
    time_limit: float = setting(0.0, help=("Stop training after this many minutes (0 = no limit); the result is "
                                           "written, and rerunning continues towards --steps."))
    """Minutes of training after which the loop ends as if ``steps`` were reached (checkpoint, result);
    all processes stop after the same step. A setting: it decides how many steps run, which the result
    records, not what a step computes."""
    seed: int = option(0, cli=False)
    """Seeds model initialisation and every batch (a batch is a function of seed, step and shard)."""
    precision: str = option("auto", choices=("auto", "fp32", "bf16"),
                            help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16.")
    """'auto' (bf16 autocast on CUDA, fp32 on the CPU), 'fp32' or 'bf16' (autocast on any device)."""
    compile: bool = option(False, help="torch.compile the model.")
    """Run the forward passes of the trained models through ``torch.compile``."""
    grad_clip: float = option(1.0, help="Clip the gradient norm (0 = off).")
    """Clip the global gradient norm of a phase to this (0 = no clipping; the norm is still computed
    for the guard)."""
    ema_decay: float = option(0.0, help="EMA of the weights (0 = off); the EMA is the result.")
    """Decay of the default EMA copies (``<model>_ema`` of every trained model; 0 = none) of tasks
    that do not declare their own."""
    checkpoint_every: int = setting(1000, help="Checkpoint every N steps.")
    """Write a checkpoint every N steps (and always on exit)."""
    keep_checkpoints: int = setting(3, help="Checkpoints kept.")
    """Keep the newest N checkpoints."""
    resume: bool = setting(True, help="Resume the latest checkpoint of the run folder.")
    """Resume from the latest checkpoint in ``run_dir`` (False: start over and replace them)."""
    log_every: int = setting(50, help="Record the loss every N steps.")
    """Record the losses (history, TensorBoard scalars) every N steps."""
    image_every: int = setting(1000, help="TensorBoard image grids every N steps (0 = never).")
    """Write TensorBoard image grids every N steps (0 = never)."""
    max_bad_steps: int = setting(20, help="Stop after N NaN/inf steps in a row.")
    """Stop after this many consecutive steps with a NaN/inf loss or gradient."""
    tensorboard: bool = setting(True, help="TensorBoard logs in the run folder.")
    """Write TensorBoard event files under ``run_dir/tensorboard``."""
    device: str = setting("auto", cli=False)
    """'auto', 'cpu', 'cuda' or 'cuda:N' (under torchrun each process uses cuda:LOCAL_RANK)."""
    deterministic: bool = option(False, help="Deterministic kernels only.")
    """Use deterministic kernels only (slower on CUDA; CPU kernels are deterministic anyway)."""
    accumulate: int = option(1, help="Micro-batches per optimizer step (gradient accumulation; the batch is "
                                     "split, not enlarged).")
    """Micro-batches per optimizer step (gradient accumulation; the batch is split, not enlarged)."""
    # not on the command line until a stage's task validates (CLeBS has no validation set)
    validate_every: int = setting(0, cli=False, help="Run the trainer's validation every N steps (0 = never).")
    """Run the task's validation every N steps (0 = never)."""
