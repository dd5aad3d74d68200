"""The one command line of testtime: `python cli.py fit|validate|test|predict|export --config ...`.

LightningCLI in subclass mode over every LightningModule and LightningDataModule of the project
(configs may name them by their short class names). `model.init_args.model_name_or_path` is
written once and linked into the datamodule (which needs the same tokenizer). `export` turns a
Lightning checkpoint into the method's serving format.

Errors in what the user asked for (a missing model or checkpoint, a bad data file, `fit` on an
evaluation-only method) end with their message and exit status 1, as config errors do; set
`TESTTIME_TRACEBACK=1` to see the traceback as well.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

# Importing the packages registers their classes, so configs may use short class names too.
import callbacks  # noqa: F401
import datamodules  # noqa: F401
import lightning_modules  # noqa: F401
from testtime.errors import SettingError, UserError

DESCRIPTION = ("testtime: train and evaluate test-time adaptation and learned decoding of Hugging Face language "
               "models (AutoDeco, TNOT/SLOT, TTT-E2E, TinyLoRA, masked-diffusion sampling, head gating). "
               "Run a recipe with `fit --config configs/<method>/<recipe>.yaml`; `<subcommand> --help` lists "
               "every setting.")

TRACEBACK_VARIABLE = "TESTTIME_TRACEBACK"


class Trainer(L.Trainer):
    """Lightning's Trainer plus `export`."""

    def export(self, model: L.LightningModule, ckpt_path: str | None = None, output_dir: str = "export",
               merged: bool = False, datamodule: L.LightningDataModule | None = None) -> None:
        """Write a serving checkpoint of the model (from ckpt_path if given) into output_dir.

        Args:
            ckpt_path: a Lightning checkpoint written by `fit`; without it the freshly configured model is exported.
            output_dir: the folder to write (the method's own format; see the README).
            merged: include the frozen base weights (methods that train heads or adapters), so the
                folder serves on its own.
        """
        if not hasattr(model, "export"):
            raise UserError(f"{type(model).__name__} does not define export(output_dir)")
        if ckpt_path and not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"export: checkpoint {ckpt_path!r} does not exist")
        model.configure_model()
        if ckpt_path:
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            model.load_state_dict(checkpoint["state_dict"], strict=model.strict_loading)
        if self.is_global_zero:
            model.export(output_dir, merged=merged)
            rank_zero_info(f"exported {type(model).__name__} to {output_dir}")


class TesttimeCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}

    def instantiate_classes(self) -> None:
        """Build the model, data and trainer. Each class checks its settings in `__init__` and raises
        ValueError naming the field, so a ValueError here is a setting the user gave: it ends with its
        message alone (`UserError`), as the errors of a run do."""
        try:
            super().instantiate_classes()
        except UserError:
            raise
        except ValueError as err:
            raise SettingError(_setting_message(err)) from err

    def _parse_ckpt_path(self) -> None:
        """Keep the settings given: the config says what to build and `--ckpt_path` fills in its
        weights (strictly, see `TesttimeModule.load_state_dict`). Lightning's default replaces the
        model's settings with those saved in the checkpoint (an evaluation grid, k, an adapter path,
        the class itself) without a word."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.model_name_or_path")
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="after fit, run test on the trained model (one command for a whole recipe)")

    def after_fit(self) -> None:
        if self.config.fit.get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule)


class _DropTips(logging.Filter):
    """Lightning's advertisements ("💡 Tip: ... try installing litlogger"), not information about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_by_design() -> None:
    """Silence what every run would print although nothing is wrong; real warnings stay visible."""
    # Frozen base models (AutoDeco, TinyLoRA, head gates) are in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # Lightning 2.6 calls a torch pytree API that torch 2.13 deprecated; nothing a user can change.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())


def _setting_message(err: ValueError) -> str:
    """The constructor's own message, with its class, out of jsonargparse's wrapping ("Does not
    validate against any of the Union subtypes ... Given value: Namespace(class_path=...)"):
    jsonargparse raises each wrapper from the error it wraps, so the innermost cause is the
    constructor's."""
    text = str(err)
    inner = err
    while inner.__cause__ is not None:
        inner = inner.__cause__
    if inner is not err and not type(inner).__module__.startswith("jsonargparse"):
        message = str(inner)
    else:
        reasons = [line.strip()[2:] for line in text.splitlines()
                   if line.strip().startswith("- ") and not line.strip().startswith("- Expected a <class 'NoneType'>")]
        message = reasons[0] if reasons else text
    found = re.findall(r"class_path='([^']+)'", text)
    return f"{found[-1]}: {message}" if found else message


def main(args: list[str] | None = None) -> None:
    quiet_by_design()
    try:
        TesttimeCLI(
            L.LightningModule,
            None,  # any LightningDataModule, and optional (export needs none)
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_class=Trainer,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": DESCRIPTION},
            args=args,
        )
    except (UserError, FileNotFoundError) as err:
        if os.environ.get(TRACEBACK_VARIABLE, "0").lower() in ("1", "true", "yes"):
            raise
        print(f"error: {err}\n(set {TRACEBACK_VARIABLE}=1 to see where it was raised)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
