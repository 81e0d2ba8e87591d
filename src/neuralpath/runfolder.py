"""A run folder: the one place that knows its files, who owns it, and whether a request may reuse it.

    config.json      the run's identity (its full training config), written when the run starts
    data.json        the copy of the data it started on (e.g. 'CIFAR-10 (JPEG copy)'): it continues on that copy only;
                     and the digest of the tensors decoded from it (a resume on other numbers is warned about)
    metrics.jsonl    one record per finished epoch
    best.pt          model of the best test epoch (the authors' protocol; the FLNPF source)
    best_even.pt     model of the best epoch on the even half of the test set (the clean FLNPF source)
    epoch_K.pt       every ``save_every`` epochs: the weights after epoch K; best_at_K.pt: the best-so-far then
    last.pt          a single run's resumable state (a stack keeps one state file for all its runs)
    result.json      written last: the run is finished
    .lock, .owner    held while a process writes the folder

Identity: a run is its full config. Resuming or reusing a folder with a config that differs is refused, naming the
differing keys, unless the key is allowed to change (``allow_change``, e.g. ``epochs``: more epochs continue the
run), and then the result record says what changed.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .errors import NeuralpathError
from .io import read_jsonl, write_json, write_text

# config keys that do not change what a run computes: where its data lives, the device and process count (the
# global batch is the same under torchrun), extra snapshots
NOT_IDENTITY = ("device", "data_root", "save_every", "world_size")
CHANGEABLE = ("epochs",)


def config_diff(old: dict, new: dict, defaults: dict | None = None) -> dict:
    """{key: (old, new)} for every identity key whose value differs. A key the old config lacks (a setting added
    in a later version) counts as its default value."""
    defaults = defaults or {}
    keys = (set(old) | set(new)) - set(NOT_IDENTITY)
    get = lambda c, k: c[k] if k in c else defaults.get(k)  # noqa: E731
    return {k: (get(old, k), get(new, k)) for k in sorted(keys) if get(old, k) != get(new, k)}


class FolderBusy(NeuralpathError):
    pass


class RunFolder:
    def __init__(self, path):
        self.path = Path(path)
        self._lock = None

    def __repr__(self):
        return f"RunFolder({str(self.path)!r})"

    # -- files ---------------------------------------------------------------------------------------------------
    def file(self, name) -> Path:
        return self.path / name

    @property
    def finished(self) -> bool:
        return self.file("result.json").exists()

    @property
    def started(self) -> bool:
        return self.file("config.json").exists()

    def config(self) -> dict | None:
        p = self.file("config.json")
        return json.loads(p.read_text()) if p.exists() else None

    def result(self) -> dict:
        return json.loads(self.file("result.json").read_text())

    def records(self) -> list:
        return read_jsonl(self.file("metrics.jsonl"))

    def start(self, config: dict, data: str = "", digest: str = ""):
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.file("config.json"), config)  # (exactly a TrainConfig's fields: TrainConfig(**it) works)
        if data:
            write_json(self.file("data.json"), {"data": data, "digest": digest} if digest else {"data": data})
        write_text(self.file("metrics.jsonl"), "")

    def _data_record(self) -> dict:
        p = self.file("data.json")
        return json.loads(p.read_text()) if p.exists() else {}

    def data(self) -> str | None:
        """The label of the data copy the run started on (None for folders written before it was recorded)."""
        return self._data_record().get("data")

    def data_digest(self) -> str | None:
        """The digest of the tensors the run started on (None for folders written before it was recorded)."""
        return self._data_record().get("digest")

    def truncate(self, epoch: int):
        """Keep the metric records of epochs <= ``epoch`` (a resumed run redoes the later ones)."""
        recs = [r for r in self.records() if r["epoch"] <= epoch]
        write_text(self.file("metrics.jsonl"), "".join(json.dumps(r, sort_keys=True) + "\n" for r in recs))

    # -- ownership -------------------------------------------------------------------------------------------------
    def acquire(self):
        """Own the folder while writing it; a second writer gets a one-line error naming the holder."""
        from filelock import FileLock, Timeout

        if self.path.exists() and not self.path.is_dir():
            raise NeuralpathError(f"--out {self.path} is an existing file, not a folder; pick another --out")
        self._created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.file(".lock")))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            holder = "another process"
            try:
                o = json.loads(self.file(".owner").read_text())
                holder = f"process {o['pid']} on {o['host']} (since {o['since']})"
            except (OSError, ValueError, KeyError):
                pass
            raise FolderBusy(
                f"{self.path} is being written by {holder}; wait for it to finish or pick another " "--out"
            ) from None
        self._lock = lock
        write_json(
            self.file(".owner"),
            {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")},
        )
        return self

    def release(self, failed: bool = False):
        """Give the folder up; after a failure, a folder this process created and left empty is removed."""
        if self._lock is not None:
            try:
                self.file(".owner").unlink(missing_ok=True)
                self.file(".lock").unlink(missing_ok=True)
            finally:
                self._lock.release()
                self._lock = None
            if failed and getattr(self, "_created", False):
                try:
                    self.path.rmdir()  # only if empty: nothing it holds is ever removed
                except OSError:
                    pass

    # -- identity --------------------------------------------------------------------------------------------------
    def check_request(self, config: dict, resume: bool, allow_change=(), defaults: dict | None = None) -> str:
        """What to do with this folder for a request: 'new', 'resume', 'done' or 'extend' (finished, more epochs).
        Raises a one-line error when the request may not use the folder."""
        for k in allow_change:
            if k not in CHANGEABLE:
                raise NeuralpathError(f"--allow-change {k}: only {', '.join(CHANGEABLE)} may change on an existing run")
        old = self.config()
        if old is None:
            if self.file("last.pt").exists() or self.finished:
                raise NeuralpathError(f"{self.path} holds run files but no config.json; pick another --out")
            return "new"
        if not resume:
            what = "a finished run" if self.finished else "an unfinished run"
            raise NeuralpathError(
                f"{self.path} already holds {what}; pass --resume to continue or reuse it, or pick " "another --out"
            )
        if self.finished:  # config.json keeps the first request; a run extended since has its result's epochs
            old = {**old, "epochs": self.result().get("epochs", old.get("epochs"))}
        diff = config_diff(old, config, defaults)
        bad = {k: v for k, v in diff.items() if k not in allow_change}
        if bad:
            desc = ", ".join(f"{k}={a!r} there vs {b!r} now" for k, (a, b) in bad.items())
            hint = " (pass --allow-change epochs to train it for more epochs)" if set(bad) == {"epochs"} else ""
            raise NeuralpathError(f"{self.path} holds a run with other settings: {desc}; pick another --out{hint}")
        if "epochs" in diff and diff["epochs"][1] < diff["epochs"][0]:
            raise NeuralpathError(
                f"{self.path}: trained for {diff['epochs'][0]} epochs, fewer ({diff['epochs'][1]}) "
                "were asked; a run is never shortened, pick another --out"
            )
        if self.finished:
            return "extend" if diff else "done"
        return "resume"
