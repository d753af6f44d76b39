"""One Weights & Biases run per training run: config, per-step metrics, diagnostics scalars.

W&B is imported only when asked for. With no API key (no ``WANDB_API_KEY`` and no
``api.wandb.ai`` entry in ``~/.netrc``), or with ``WANDB_MODE=offline``, the run is
written offline under ``<run dir>/wandb/`` and ``sync_command`` says how to upload it.
Only scalars are logged (never tensors). A resumed training run continues the same W&B
run (its id is kept in ``<run dir>/wandb_id.txt``).
"""

from __future__ import annotations

import math
import netrc
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from scalemix.errors import ConfigError


@dataclass(frozen=True)
class WandbSettings:
    project: str = "scalemix"
    entity: str | None = None
    group: str | None = None
    job_type: str | None = None
    name: str | None = None
    tags: tuple[str, ...] = ()
    notes: str | None = None
    extra_config: dict = field(default_factory=dict)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode() -> str:
    """'online', 'offline' or 'disabled': WANDB_MODE if set, else offline without an API key."""
    mode = os.environ.get("WANDB_MODE")
    if mode in ("online", "offline", "disabled", "dryrun"):
        return "offline" if mode == "dryrun" else mode
    return "online" if _has_api_key() else "offline"


def _import_wandb():
    try:
        import wandb
    except ImportError:  # pragma: no cover - wandb is a dependency
        raise ConfigError("--wandb needs the wandb package: pip install wandb") from None
    return wandb


def _scalar(v):
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, (int, float)):
        return v if math.isfinite(v) else None
    return v


class WandbRun:
    def __init__(self, settings: WandbSettings, root: str | Path, config: dict):
        wandb = _import_wandb()
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.mode = wandb_mode()
        id_file = self.root / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        try:
            self.run = self._init(wandb, settings, config, run_id)
        except Exception as e:
            raise ConfigError(
                f"W&B could not start a run ({type(e).__name__}: {e}); "
                "set WANDB_MODE=offline or run without --wandb"
            ) from None

    def _init(self, wandb, settings: WandbSettings, config: dict, run_id: str):
        return wandb.init(
            project=settings.project,
            entity=settings.entity,
            group=settings.group,
            job_type=settings.job_type,
            name=settings.name,
            tags=list(settings.tags) or None,
            notes=settings.notes,
            config={**config, **settings.extra_config},
            dir=str(self.root),
            id=run_id,
            resume="allow",
            mode=self.mode,
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, values: dict, step: int) -> None:
        clean = {k: _scalar(v) for k, v in values.items() if _scalar(v) is not None}
        if clean:
            self.run.log(clean, step=step)

    def log_diagnostics(self, rows: list[dict], step: int) -> None:
        # the source stays in the key: train rows are NOT covered by epsilon, heldout ones are
        self.log(
            {
                f"diag/{r.get('source', 'train')}/{r['block']}/{r['metric']}": r["value"]
                for r in rows
            },
            step,
        )

    def log_table(self, key: str, frame) -> None:
        wandb = _import_wandb()
        self.run.log({key: wandb.Table(dataframe=frame)})

    def summary(self, values: dict) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float, str, bool)) and _scalar(v) is not None:
                self.run.summary[k] = v

    def finish(self, exit_code: int = 0) -> str | None:
        """Close the run; the ``wandb sync`` command when it was written offline."""
        path = Path(self.run.dir).parent
        self.run.finish(exit_code=exit_code)
        if self.mode != "offline":
            return None
        from scalemix.tracking.wandb_file import wait_until_complete

        if not wait_until_complete(path):
            raise RuntimeError(f"W&B did not finish writing {path} within 60 s")
        return f"wandb sync {path}"
