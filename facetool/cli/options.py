"""The training options: one definition, one default and one help text each, for every command that trains.

``@training_options(epochs=..., batch_size=..., lr=..., schedule=...)`` under ``@guarded`` gives a command
all of :data:`OPTIONS` (appended to its signature, so Typer shows and parses them like its own) and hands
it one :class:`TrainOptions` as its ``train`` parameter; ``TrainConfig.from_options(train, out=...)``
turns that into the engine's config. Only :data:`PER_METHOD` (how long and how fast a method trains)
may take a per-command default; the mechanics (grad clip, AMP, flips, warm-up, workers, seed,
validation interval, max steps ...) have the same default and help everywhere, and a test compares
every training command's options (tests/test_cli_options.py). Torch-free: ``--help`` stays light.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import typer


@dataclass(frozen=True)
class TrainOptions:
    """What the user asked of the training loop (CLI spelling: 0 = off / all; ``milestones`` as typed).
    ``facetool.engine.TrainConfig.from_options`` checks and converts it."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    schedule: str = "cosine"
    milestones: str = ""
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    grad_clip: float = 0.0
    amp: bool = True
    flip: bool = True
    workers: int = 0
    seed: int = 0
    val_every: int = 1
    val_fraction: float = 0.2  # facetool.data.sources.VAL_FRACTION (not imported: --help stays light)
    log_every: int = 50
    max_steps: int = 0
    resume: bool = False
    overwrite: bool = False


@dataclass(frozen=True)
class Spec:
    """One training option: parameter name, type, default, the flag(s) Typer parses and the help."""

    name: str
    type: type
    default: Any
    flags: tuple[str, ...]
    help: str


_D = TrainOptions()

#: every training option, in the order ``--help`` lists them (after the command's own options)
OPTIONS: tuple[Spec, ...] = (
    Spec("epochs", int, _D.epochs, ("--epochs",), "Training epochs."),
    Spec("batch_size", int, _D.batch_size, ("--batch-size",), "Images per optimizer step and process "
         "(under torchrun each process takes this many)."),
    Spec("lr", float, _D.lr, ("--lr",), "Peak learning rate (SGD), reached after --warmup-epochs."),
    Spec("schedule", str, _D.schedule, ("--schedule",), "Learning-rate schedule per step after warm-up: cosine | "
         "step (x --lr-gamma at each of --milestones) | poly (power 2, arcface_torch)."),
    Spec("milestones", str, _D.milestones, ("--milestones",), "Epochs at which --schedule step multiplies the "
         "learning rate by --lr-gamma, comma-separated (e.g. 30,60,90)."),
    Spec("lr_gamma", float, _D.lr_gamma, ("--lr-gamma",), "Factor of the step schedule at each milestone."),
    Spec("momentum", float, _D.momentum, ("--momentum",), "SGD momentum."),
    Spec("weight_decay", float, _D.weight_decay, ("--weight-decay",), "SGD weight decay."),
    Spec("warmup_epochs", float, _D.warmup_epochs, ("--warmup-epochs",), "Linear learning-rate warm-up (epochs, "
         "may be fractional)."),
    Spec("grad_clip", float, _D.grad_clip, ("--grad-clip",), "Clip the gradient norm to this (0 = off; "
         "arcface_torch's recipe: 5)."),
    Spec("amp", bool, _D.amp, ("--amp/--no-amp",), "Mixed precision on CUDA (no effect on the CPU)."),
    Spec("flip", bool, _D.flip, ("--flip/--no-flip",), "Random horizontal flips of the training images."),
    Spec("workers", int, _D.workers, ("--workers",), "DataLoader worker processes (0 = load in the main "
         "process; exact resume needs 0)."),
    Spec("seed", int, _D.seed, ("--seed",), "Seed of the model init, data order and augmentation."),
    Spec("val_every", int, _D.val_every, ("--val-every",), "Validate every N epochs (and always after the "
         "last one)."),
    Spec("val_fraction", float, _D.val_fraction, ("--val-fraction",), "Share of each identity's images held out for "
         "validation when --store is a RecordIO pack (a per-identity split, the same on every run and rank; a face "
         "store keeps the split it was prepared with: set it there with prepare --test-fraction)."),
    Spec("log_every", int, _D.log_every, ("--log-every",), "Print a progress line every N steps when the output "
         "is not a terminal (a terminal gets a progress bar; 0 = never)."),
    Spec("max_steps", int, _D.max_steps, ("--max-steps",), "Stop after this many optimizer steps in total "
         "(0 = all epochs; continue with --resume)."),
    Spec("resume", bool, _D.resume, ("--resume",), "Continue the interrupted run in --out."),
    Spec("overwrite", bool, _D.overwrite, ("--overwrite",), "Start over in an existing --out."),
)

#: the --help panel that lists them
PANEL = "Training options (shared by every command that trains)"
#: the options a command may give its own default: how long and how fast its method trains
PER_METHOD = ("epochs", "batch_size", "lr", "schedule", "milestones")
#: the mechanics: one default, one help text, in every command
MECHANICS = tuple(s.name for s in OPTIONS if s.name not in PER_METHOD)


def training_options(**defaults: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator giving a command every option of :data:`OPTIONS`; ``defaults`` override the defaults of
    :data:`PER_METHOD` options only. The command declares a parameter ``train`` (a :class:`TrainOptions`)
    and none of the training options itself. Put it under ``@guarded`` (which copies the signature)."""
    wrong = sorted(set(defaults) - set(PER_METHOD))
    if wrong:
        raise TypeError(f"only {', '.join(PER_METHOD)} take a per-command default, not {', '.join(wrong)}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn, eval_str=True, locals={"TrainOptions": TrainOptions})
        if "train" not in sig.parameters:
            raise TypeError(f"{fn.__name__} needs a parameter 'train' to receive the TrainOptions")
        own = [p for name, p in sig.parameters.items() if name != "train"]
        clash = sorted({p.name for p in own} & {s.name for s in OPTIONS})
        if clash:
            raise TypeError(f"{fn.__name__} declares training option(s) {', '.join(clash)} itself")
        added = [inspect.Parameter(s.name, inspect.Parameter.KEYWORD_ONLY, annotation=s.type,
                                   default=typer.Option(defaults.get(s.name, s.default), *s.flags, help=s.help,
                                                        rich_help_panel=PANEL))
                 for s in OPTIONS]

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            train = TrainOptions(**{s.name: kwargs.pop(s.name) for s in OPTIONS})
            return fn(*args, train=train, **kwargs)

        command.__signature__ = sig.replace(parameters=own + added)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in own + added}
        return command

    return deco
