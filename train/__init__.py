"""Training for LLaMA-Adapter V2: ``pretrain``, ``finetune`` and the paper's ``joint`` training,
with the same code on a laptop CPU and on many GPUs (accelerate: DDP, FSDP, DeepSpeed).

Command line (``--help`` lists every config key; see also ``train/README.md``)::

    python -m train pretrain|finetune|joint --config FILE.yaml [KEY=VALUE ...] [--resume]
    accelerate launch [--config_file configs/accelerate/...] -m train joint --config FILE.yaml
    python -m train.evaluate vqa|perplexity|mme ...

Python API — a recipe script trains with an in-code config and its own samples::

    import llama_adapter
    import train

    adapter_file = train.run(
        {
            "stage": "finetune",                  # pretrain | finetune | joint
            "output_dir": "runs/demo",
            "model": {
                "base": "smollm2-135m",           # or a LLaMA folder, .gguf, hub id, "tiny"
                "adapter": {"image_encoder": "efficientnet-lite0", "visual_dim": 256, "visual_depth": 2},
                # "init_adapter": "runs/pretrain/adapter.safetensors",  # continue from another stage
            },
            "data": {
                "sources": [
                    {"path": "data/instructions.json"},                   # files (see below)
                    {"samples": my_samples, "weight": 2.0, "name": "demo"},  # or in-memory samples
                ],
                "batch_size": 4,
            },
            "optim": {"epochs": 3, "blr": 1e-2},  # unset keys: the official 7B recipe
        }
    )
    pipe = llama_adapter.load(adapter=adapter_file)  # the file names its base and prompt template

* ``run(config, overrides=None) -> Path`` trains and returns the final adapter
  (``output_dir/adapter.safetensors``, the library's format). ``config`` is a
  :class:`TrainConfig`, a dict of the same nested shape, or a YAML path (then ``overrides`` are
  ``"key.path=value"`` strings). ``"resume": "auto"`` continues from the latest checkpoint.
* :class:`TrainConfig` / :func:`load_config` — the typed config (``model``, ``data``, ``optim``,
  ``engine``, ``checkpoint``, ``log`` sections). Step-level control: ``state = setup(config)``
  builds a :class:`TrainState`; ``fit(state)`` trains it; ``train.step.train_step(state,
  micro_batches)``, ``train.trainer.data_loader(state, start, stop)`` and
  ``train.checkpoint.save_checkpoint(state)`` are the pieces ``fit`` runs.
* Samples (``samples``: a list, or a map-style Dataset read once) are dicts in any training
  format: ``{"image"?, "instruction", "input"?, "output"}`` (Alpaca),
  ``{"image"?, "conversations": [{"from": "human"|"gpt", "value"}]}`` (LLaVA, multi-turn),
  ``{"image"?, "messages": [{"role", "content"}]}``, ``{"image", "caption"}`` (image-text pairs,
  a source of them trains the pretrain group in ``joint``) or ``{"image", "question", "answer"}``.
  An image is a path (relative to the source's ``image_root``), a URL, bytes or a PIL image.
  Rows that fail (missing/corrupt image, empty answer) are skipped and counted, never fatal.
* :mod:`train.evaluate`: ``evaluate_vqa``, ``evaluate_perplexity``, ``write_mme_answers``,
  ``load_pipeline`` (also for adapters trained on the random tiny bases).
"""

from .config import TrainConfig, load_config
from .trainer import TrainState, fit, run, setup

__all__ = ["TrainConfig", "TrainState", "fit", "load_config", "run", "setup"]
