"""The samples a run trains on: its records as a dataset (`build_dataset`) and each process's endless stream
of them, epoch after epoch (`SampleStream`), which skips bad samples and keeps its position for checkpoints."""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys

import torch
from PIL import Image

from internvl_mpo.chat.tokenizer import Tokenizer
from internvl_mpo.config import ModelConfig
from internvl_mpo.errors import InputError
from internvl_mpo.train.data import (
    BadExample,
    Batch,
    MediaSettings,
    PairDataset,
    SFTDataset,
    collate_pairs,
    collate_sft,
)
from internvl_mpo.train.distributed import DistEnv, all_gather_lists, epoch_order, rank_share, share_start
from internvl_mpo.train.fingerprints import share_digest
from internvl_mpo.train.mmpr import SkipReport, load_meta, read_datasets, read_sft_records
from internvl_mpo.train.reference import REF_FILE
from internvl_mpo.train.settings import TrainConfig, count, max_seq_length

PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies


def build_dataset(cfg: TrainConfig, tokenizer: Tokenizer, config: ModelConfig) -> tuple[PairDataset | SFTDataset, SkipReport]:
    """Records in training order (official per-dataset sampling and shuffling) wrapped as a dataset."""
    settings = MediaSettings.from_model_config(config, cfg.max_dynamic_patch, cfg.video_frames, cfg.max_pixels)
    seq_length = max_seq_length(cfg, config)
    # meta.json's per-dataset max_dynamic_patch applies unless --max-dynamic-patch is given (the official
    # code lets meta.json win over its argument; here the explicit flag wins)
    use_meta = cfg.max_dynamic_patch is None
    report = SkipReport()
    if cfg.mode != "sft":
        specs = load_meta(cfg.data)
        records, report = read_datasets(specs, skip_bad=cfg.skip_bad, sample_seed=cfg.seed)
        max_num = {s.name: s.max_dynamic_patch for s in specs if use_meta and s.max_dynamic_patch is not None}
        dataset: PairDataset | SFTDataset = PairDataset(
            records, tokenizer, settings, seq_length, max_num, cfg.rejected_span,
            augment_datasets={s.name for s in specs if s.data_augment}, seed=cfg.seed,
        )
    else:
        skip = report if cfg.skip_bad else None
        if cfg.single_jsonl:
            root = cfg.image_root if cfg.image_root is not None else os.path.dirname(os.path.abspath(cfg.data))
            records, max_nums, augment = read_sft_records(cfg.data, root, report=skip), None, None
        else:
            # The official fine-tuning datasets cut or repeat (`read_sft_records`) and augment per dataset.
            records, max_nums, augment = [], [], []
            for spec in load_meta(cfg.data):
                good = read_sft_records(spec.annotation, spec.root, report=skip, repeat_time=spec.repeat_time)
                records += good
                max_nums += [spec.max_dynamic_patch if use_meta else None] * len(good)
                augment += [spec.data_augment] * len(good)
        dataset = SFTDataset(records, tokenizer, settings, seq_length, max_nums, augment, seed=cfg.seed)
    if len(dataset) == 0:
        skipped = ""
        if report.total:  # --skip-bad dropped them all (a wrong `root`, say): say why
            problems = "problem" if len(report.messages) == 1 else "problems"
            skipped = (f": {count(report.total, 'bad record')} skipped (--skip-bad); first {problems}: "
                       f"{'; '.join(report.messages)}")
        raise InputError(f"{cfg.data}: no usable training records{skipped}")
    return dataset, report


def _identity(x):
    return x


def _start_worker(limit: int | None, parent: int, worker_id: int) -> None:
    """A spawned loader worker's start: Pillow's limit as the training process set it (`--max-pixels` raises
    it, `let_pillow_open`); the worker would have Pillow's default, which refuses images past twice that.
    SIGTERM is ignored: sent to all of a job's processes (SLURM does), it would end the worker, and the
    training process with it mid-step, before the training process saves and stops (`stopping`), which ends
    its workers. They also end when it dies (`_end_with`)."""
    Image.MAX_IMAGE_PIXELS = limit
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _end_with(parent)


def _end_with(parent: int) -> None:
    """End this worker when the training process `parent` dies (on Linux the kernel kills it then). torch's
    watchdog compares the worker's parent with the one it had when its loop started: a worker whose training
    process was killed (SIGKILL, the OOM killer) while it started took init for its parent, and waited for work
    for good, holding its memory."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before that: the kernel sends nothing
        os._exit(0)


class SampleStream:
    """This rank's endless sequence of samples, epoch after epoch; its position is (epoch, cursor).

    Bad samples (`BadExample`) raise InputError naming their file:line, or, with `skip_bad`, are
    counted in `report` (once per record, whatever the epoch) and replaced by the next sample; a
    whole epoch of bad samples raises InputError (there is nothing to train on), and so does a rank's share of an
    epoch when the next epoch deals it only records known to be bad. With `ref_valid`
    (precomputed reference log-probs), a record the reference pass could not encode is a bad sample too.
    """

    def __init__(self, dataset, env: DistEnv, cfg: TrainConfig, report: SkipReport):
        self.dataset = dataset
        self.env = env
        self.seed = cfg.seed
        self.shuffle = cfg.shuffle
        self.skip_bad = cfg.skip_bad
        self.num_workers = cfg.num_workers
        self.report = report
        self.epoch = 0
        self.cursor = 0
        self.bad: set[int] = set()
        self._bad_run = 0  # bad samples in a row
        self._share_len = 0  # this rank's records in the epoch being read
        self._new_bad: list[tuple[int, str, str]] = []  # (index, kind, message) skipped since `share_bad`
        self.cut = 0  # samples batched since the step's metrics whose answers were cut to --max-seq-length
        self.first_cut: str | None = None  # the first of them on this rank (file:line)
        self.first_cut_at: int | None = None  # its place in the run's stream (all ranks': epoch * n + position)
        self._position = 0  # the stream position of the last example `next_example` gave
        self._items = None
        self.ref_valid: torch.Tensor | None = None

    def per_rank(self) -> int:
        """Samples per rank in one epoch, rounded down (the steps of an epoch are counted from it)."""
        return len(self.dataset) // self.env.world_size

    def epochs_read(self) -> float:
        """Epochs of the stream read by all ranks together, up to this rank's next sample."""
        n, world = len(self.dataset), self.env.world_size
        return self.epoch + (share_start(n, self.env.rank, world, self.epoch) + self.cursor * world) / n

    def _share(self, epoch: int) -> list[int]:
        """This rank's records of `epoch`, in its order."""
        order = epoch_order(len(self.dataset), epoch, self.seed, self.shuffle)
        return rank_share(order, self.env.rank, self.env.world_size, epoch)

    def _open(self):
        share = self._share(self.epoch)
        self._share_len = len(share)
        order = share[self.cursor :]
        dataset = self.dataset.at_epoch(self.epoch)  # the epoch seeds the data augmentation
        if self.num_workers == 0:
            return (dataset[i] for i in order)
        # Spawned workers (forked ones would inherit the image module's thread pool in a broken state); a
        # generator of its own keeps the loader from drawing on the global RNG that drop-path uses.
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, sampler=order, num_workers=self.num_workers, collate_fn=_identity,
            multiprocessing_context="spawn", generator=torch.Generator().manual_seed(self.seed + self.epoch),
            worker_init_fn=functools.partial(_start_worker, Image.MAX_IMAGE_PIXELS, os.getpid()),
        )
        return iter(loader)

    def close(self) -> None:
        """Ends the loader's worker processes, if any (reading again starts new ones)."""
        self._items = None

    def next_example(self):
        while True:
            if self._items is None:
                self._items = self._open()
            item = next(self._items, None)
            if item is None:
                # A share of the epoch with no usable sample: the run stops unless the next epoch deals this rank a
                # record not known to be bad (a shuffled or rotated share: with several processes one share can be
                # all bad while the epoch holds usable ones, which a single process would train on)
                if self._bad_run >= self._share_len and self.bad.issuperset(self._share(self.epoch + 1)):
                    n = self._share_len
                    samples = "the 1 sample of this process was" if n == 1 else f"all {n} samples of this process were"
                    problems = "problem" if len(self.report.messages) == 1 else "problems"
                    more = ""
                    if self.env.world_size > 1:
                        more = (f", and the next epoch deals it only records known to be bad ({self.env.world_size} "
                                "processes share each epoch; fewer, or shuffling without --no-shuffle, deal the "
                                "records otherwise)")
                    raise InputError(f"no usable sample in a whole epoch: {samples} bad and skipped (--skip-bad)"
                                     f"{more}; first {problems}: {'; '.join(self.report.messages)}")
                self.epoch, self.cursor, self._items = self.epoch + 1, 0, None
                continue
            n, world = len(self.dataset), self.env.world_size  # a skipped bad record takes its place in the stream
            self._position = self.epoch * n + share_start(n, self.env.rank, world, self.epoch) + self.cursor * world
            self.cursor += 1
            if not isinstance(item, BadExample) and self.ref_valid is not None and not self.ref_valid[item.index]:
                item = BadExample(item.index, "reference", f"{item.source}: no reference log-probs: the --precompute-ref"
                                  f" pass could not encode this record (delete {REF_FILE} to recompute them)")
            if isinstance(item, BadExample):
                if not self.skip_bad:
                    raise InputError(item.message + " (pass --skip-bad to skip such records)")
                if item.index not in self.bad:
                    self.bad.add(item.index)
                    self.report.add(item.kind, item.message)
                    self._new_bad.append((item.index, item.kind, item.message))
                self._bad_run += 1
                continue
            self._bad_run = 0
            return item

    def next_batch(self, batch_size: int, pad_id: int) -> Batch:
        examples, positions = [], []
        for _ in range(batch_size):
            examples.append(self.next_example())
            positions.append(self._position)
        cut = [k for k, e in enumerate(examples) if e.truncated]
        self.cut += len(cut)
        if cut and self.first_cut is None:  # its place in the stream, records skipped as bad counted
            self.first_cut = examples[cut[0]].source
            self.first_cut_at = positions[cut[0]]
        if isinstance(self.dataset, PairDataset):
            return collate_pairs(examples, pad_id)
        return collate_sft(examples, pad_id)

    def share_bad(self) -> None:
        """Counts the records the other ranks skipped since the last call here too (every rank all of them,
        each record once), so that the report and the `skipped` metric cover the whole run."""
        new, self._new_bad = self._new_bad, []
        if self.skip_bad and self.env.distributed:
            for index, kind, message in all_gather_lists(new, self.env):
                if index not in self.bad:
                    self.bad.add(index)
                    self.report.add(kind, message)

    def share_sha256(self, epoch: int, rank: int) -> str:
        """Digest of the records `rank` reads in `epoch`, which a resume compares with its checkpoint's."""
        return share_digest(self.dataset.records, epoch, self.seed, self.shuffle, rank, self.env.world_size)

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "bad": sorted(self.bad),
                "share_sha256": self.share_sha256(self.epoch, self.env.rank)}

    def restore(self, state: dict) -> None:
        self.epoch, self.cursor, self._items = int(state["epoch"]), int(state["cursor"]), None
        self.bad = set(state.get("bad", []))
