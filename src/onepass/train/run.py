"""Assembling a training run from its config: process group, tokenizer and template, prepared data,
the step plan, model and objective, optimizer and schedule, checkpointer and evaluator. The
`Trainer` then only loops over what is built here."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from onepass import allocator
from onepass.config import DataSource, TrainConfig, check_cross_fields, to_dict
from onepass.data.cache import PreparedData
from onepass.data.chat_template import ChatTemplate, load_chat_template
from onepass.data.prepare import load_conversations, prepare
from onepass.data.stats import Stats
from onepass.data.report import nothing_left, summary_line
from onepass.data.tokenizer import load_tokenizer
from onepass.data.types import Example, has_trees
from onepass.errors import OnepassError
from onepass.hub import dataset_files
from onepass.train import distributed
from onepass.train.checkpoint import Checkpointer
from onepass.train.distributed import Cluster
from onepass.train.evaluation import EarlyStopping, Evaluator, SampleReplies
from onepass.train.loss import SFTObjective
from onepass.train.mixture import Mixture, describe as describe_mixture
from onepass.train.check import apply_check
from onepass.train.handle import ModelHandle, build_model, check_model, prepare_for_training
from onepass.train.model import check_model_dir, device_of
from onepass.train.attention import PACKED, use_tree_attention
from onepass.train.plan import StepPlan
from onepass.train.device import describe_precision, uses_bf16
from onepass.train.step import StepOptions
from onepass.train.trackers import check_trackers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    """Everything a training loop needs, built and checked."""

    config: TrainConfig
    cluster: Cluster
    tokenizer: Any
    template: ChatTemplate
    train_data: PreparedData
    plan: StepPlan
    total_steps: int
    handle: ModelHandle  # the model as prepared for training (`model`), and how to give it back (`restore`)
    objective: torch.nn.Module  # the model with the SFT loss as its forward, wrapped for data parallelism
    optimizer: Any
    scheduler: Any
    step_options: StepOptions
    checkpointer: Checkpointer
    evaluator: Evaluator
    early_stopping: EarlyStopping
    samples: SampleReplies

    @property
    def model(self) -> Any:
        """The model trained: the model given or loaded, or its LoRA wrapper."""
        return self.handle.model

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)


def build_run(config: TrainConfig, *, model: Any = None, tokenizer: Any = None, train_data: PreparedData | None = None,
              eval_examples: list[Example] | None = None, prepare_data: Callable[..., PreparedData] = prepare) -> Run:
    """Build a run. Cheap checks (model directory, tokenizer, chat template) come before data
    preparation, and data checks before the model is loaded. Given pieces are used as they are; a
    model given is prepared for training as a loaded one is (LoRA, checkpointing, accelerations,
    compile, as `config` says), and `Run.handle.restore()` gives it back."""
    cluster = distributed.init()  # joins torchrun's process group if there is one (once)
    torch.manual_seed(config.seed)  # the same initial weights (e.g. LoRA adapters) on every rank
    if model is None:
        check_model_dir(config.model)  # a bad model dir fails now, not after data preparation
    check_trackers(config.report_to)
    tokenizer = tokenizer or load_tokenizer(config.tokenizer or config.model)
    template = load_chat_template(tokenizer, config.data.chat_template, config.data.chat_template_kwargs)
    train_data, eval_examples, train_files = _prepare_data(config, cluster, tokenizer, template, train_data,
                                                           eval_examples, prepare_data)
    check_cross_fields(config, held_out=bool(eval_examples))
    mixture = Mixture(train_data.examples, config.data.sources(), train_files) if config.data.weighted() else None
    if mixture is not None and cluster.is_main:
        log.info(describe_mixture(mixture.shares()))
    plan = StepPlan(train_data.examples, config.max_seq_len, config.batch_size, config.grad_accum, config.seed,
                    config.loss_normalization, cluster, mixture)
    total_steps = config.max_steps or plan.total_steps(config.epochs)
    if model is None:
        weights = distributed.loads_weights(cluster, config.strategy)
        handle = build_model(config, distributed.loading_device(cluster, config.strategy), announce=cluster.is_main,
                             weights=weights, compute_device=cluster.device)
    else:
        if cluster.is_distributed and config.strategy == "fsdp":
            raise OnepassError("strategy: fsdp with a model passed in: each rank would hold the whole model, and "
                               "the export rebuilds it from the model directory. Fix: give options.model (the "
                               "model's directory) and no model object, or use strategy: ddp.")
        handle = prepare_for_training(model.to(cluster.device), config, cluster.device, announce=cluster.is_main)
    try:  # a model given back as it came where what follows fails (the check refuses it, ...)
        model = handle.model
        _check_model(config, cluster, handle)
        if has_trees(train_data.examples) or has_trees(eval_examples):
            use_tree_attention(model)
        objective = SFTObjective(model, config.loss_chunk_size, handle.head_loss)
        rank0_state = objective.state_dict() if cluster.is_main and config.strategy == "fsdp" else None
        objective = distributed.parallelize(objective, cluster, config.strategy, config.ddp_find_unused_parameters,
                                            uses_bf16(config.precision, cluster.device))
        if cluster.is_distributed and config.strategy == "fsdp":
            distributed.receive_weights(objective, rank0_state, cluster)
            del rank0_state  # the whole model's weights: only the shards stay
        optimizer, scheduler = build_optimizer(distributed.unwrap(objective), config, total_steps)
        checkpointer = Checkpointer(config.output_dir, config.save_every, config.keep_last,
                                    yaml.safe_dump(to_dict(config), sort_keys=False), cluster)
        evaluator = Evaluator(eval_examples, config.max_seq_len, config.batch_size, config.eval_every, config.precision,
                              cluster)
        early_stopping = EarlyStopping(config.early_stopping.patience, config.early_stopping.min_delta)
        samples = _sample_replies(config, cluster, handle.original_attention)
        step_options = StepOptions(config.precision, config.max_grad_norm, config.on_nonfinite)
        if cluster.is_main:
            sharded_bf16 = cluster.is_distributed and config.strategy == "fsdp" and uses_bf16(config.precision,
                                                                                               cluster.device)
            log.info(describe_precision(config.precision, cluster.device)
                     + ("; FSDP2 gathers parameters in bf16 and reduces gradients in fp32" if sharded_bf16 else ""))
            if cluster.device.type == "cpu":
                log.info(allocator.describe())
        return Run(config, cluster, tokenizer, template, train_data, plan, total_steps, handle, objective,
                   optimizer, scheduler, step_options, checkpointer, evaluator, early_stopping, samples)
    except BaseException:
        handle.restore()
        raise


def source_files(sources: list[DataSource]) -> list[list[Path]]:
    """The files of each data entry: a local path, or a Hub dataset's files of its split (onepass.hub)."""
    return [dataset_files(s.path, s.split, s.subset, s.revision) for s in sources]


def _check_model(config: TrainConfig, cluster: Cluster, handle: ModelHandle) -> None:
    """The start-up proof (`handle.check_model`) on rank 0, which holds the weights under every strategy;
    every rank then takes the packing it chose, or stops with its error."""
    if not config.check_model:
        if cluster.is_main:
            log.info("checked: no (check_model: false): onepass's path is not compared with the model's own forward")
        return
    model = handle.model
    outcome: tuple[str | None, str, str | None] = (PACKED, "", None)
    if cluster.is_main:
        try:
            # FSDP2's rank 0 checks the model in CPU memory, before sharding it onto the GPUs: flash is not run there
            result = check_model(handle, compare_flash=device_of(model).type == cluster.device.type).check
            message = result.describe()
            if not result.prefix_consistent:
                message += ("\nnote: training follows the model's own forward on whole sequences, as every trainer "
                            "does; scores per turn need one pass per turn on this model (onepass score does that)")
            outcome = (result.packing, message, result.attention)
        except OnepassError as error:
            outcome = (None, str(error), None)
    packing, message, attention = distributed.broadcast(outcome, cluster)
    if packing is None:
        raise OnepassError(message)
    apply_check(model, packing, attention)  # every rank takes rank 0's choice
    if cluster.is_main:
        log.info(message)


def _prepare_data(config: TrainConfig, cluster: Cluster, tokenizer: Any, template: ChatTemplate,
                  train_data: PreparedData | None, eval_examples: list[Example] | None,
                  prepare_data: Callable[..., PreparedData]
                  ) -> tuple[PreparedData, list[Example], list[list[Path]]]:
    """Train and held-out data, prepared by rank 0 first (the others load its cache), and checked, with
    the files of each training source (a Hub dataset's fetched by rank 0 first too)."""
    output_dir = Path(config.output_dir)

    def prepare_split(files: list[list[Path]], rejects_name: str) -> PreparedData:
        paths = [file for source in files for file in source]
        return prepare_data(paths, tokenizer, template, config.render_options(), format_name=config.data.format,
                            on_bad_record=config.data.on_bad_record, num_workers=config.data.num_workers,
                            cache_dir=config.data.cache_dir,
                            rejects_file=output_dir / rejects_name if cluster.is_main else None)

    with distributed.main_first(cluster):
        train_files = source_files(config.data.sources())
        train_data = train_data or prepare_split(train_files, "rejects.jsonl")
        eval_data = prepare_split(source_files(config.data.eval_sources()), "rejects.eval.jsonl") \
            if eval_examples is None and config.data.eval else None
    _report_data(config, cluster, train_data, eval_data)
    if eval_examples is None:
        eval_examples = eval_data.examples if eval_data is not None else []
    return train_data, eval_examples, train_files


def _report_data(config: TrainConfig, cluster: Cluster, train_data: PreparedData, eval_data: PreparedData | None
                 ) -> None:
    """Say what became of every record, and stop when a split prepared into nothing."""
    if cluster.is_main:
        log.info(summary_line("train data", train_data.stats))
        if eval_data is not None:
            log.info(summary_line("eval data", eval_data.stats))
        if train_data.rejects or (eval_data is not None and eval_data.rejects):
            log.info(f"skipped records and their reasons: {config.output_dir}/rejects*.jsonl")
    if not len(train_data.examples):
        raise nothing_left("training", train_data.stats, config.max_seq_len)
    if eval_data is not None and not len(eval_data.examples):
        raise nothing_left("eval", eval_data.stats, config.max_seq_len)


def _sample_replies(config: TrainConfig, cluster: Cluster, own_attention: str | None = None) -> SampleReplies:
    """The held-out prompts whose replies are shown at each evaluation (rank 0 only)."""
    if not config.eval_samples:
        return SampleReplies([], Path(config.output_dir), enabled=False)
    if cluster.is_distributed and config.strategy == "fsdp":
        raise OnepassError("eval_samples needs the whole model on rank 0, which strategy: fsdp shards. Fix: use "
                           "strategy: ddp, or set eval_samples: 0.")
    files = [file for files in source_files(config.data.eval_sources()) for file in files]
    conversations = load_conversations(files, config.data.format, "skip", Stats(), [],
                                       limit=config.eval_samples) if cluster.is_main else []
    return SampleReplies(conversations, Path(config.output_dir), enabled=cluster.is_main,
                         options=config.render_options(), own_attention=own_attention)


def build_optimizer(model: Any, config: TrainConfig, total_steps: int) -> tuple[Any, Any]:
    """AdamW over the trainable parameters, with warmup and the configured schedule. The fused kernel:
    one pass over each parameter instead of a dozen foreach ops (bench/real_model.py)."""
    from transformers import get_scheduler

    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[config.schedule]
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps)
    return optimizer, scheduler
