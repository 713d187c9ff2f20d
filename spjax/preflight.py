"""Checks before a run spends compute: each raises ConfigError with one line naming the field, or
says in one line what the run will do that a user may not expect. Called by spjax.rounds.setup."""
from __future__ import annotations

import os

from spjax import objectives, sampler, sharding as shd
from spjax.config import Config, ConfigError


def check_config(cfg: Config, n_devices: int):
    """Every check that needs no data and no compile; raises ConfigError with one clear line."""
    dp_shape = shd.mesh_shape(cfg.mesh, n_devices)
    dp = dp_shape[0] * dp_shape[1]
    for field, n in (("run.batch_size", cfg.run.batch_size), ("sampling.batch_size", cfg.sampling.batch_size)):
        if n % dp:
            raise ConfigError(f"{field}: {n} is not divisible by the data-parallel size {dp} "
                              f"(mesh data*fsdp = {dp_shape[0]}*{dp_shape[1]})")
    if (cfg.run.batch_size // cfg.optim.grad_accum) % dp:
        raise ConfigError(f"optim.grad_accum: micro-batches of {cfg.run.batch_size // cfg.optim.grad_accum} "
                          f"pairs do not split over {dp} data-parallel devices")
    # Cross-group checks of the judge settings (overrides are applied together, so any order passes here).
    if cfg.run.pairs == "judged" and not cfg.judge.name:
        raise ConfigError("run.pairs: 'judged' needs a judge (judge.name)")
    if cfg.run.keep_best == "judge_score" and not cfg.judge.name:
        raise ConfigError("run.keep_best: 'judge_score' needs a judge (judge.name) to score held-out answers")
    if cfg.run.pairs == "judged" and cfg.judge.name and cfg.sampling.num_samples < 2:  # (auto: check_pairs)
        raise ConfigError(_one_sample(cfg))
    kind, _, arg = cfg.judge.name.partition(":")
    for field, path in (("model_path", cfg.model_path), ("lora.init_path", cfg.lora.init_path),
                        ("judge.name", arg if kind == "reward_model" else "")):
        if path and not os.path.exists(path):
            raise ConfigError(f"{field}: {path} does not exist")
    if kind == "python":  # imported now: a missing module is one line before any data or model loads
        from spjax import judges
        judges.python_function(cfg.judge.name)
    if kind == "reward_model":  # its config.json names a sequence classifier: said before the data and policy load
        from spjax import hf, reward_model
        where = os.path.join(arg, "config.json")
        try:
            reward_model.classifier_arch(hf.read_json(where), where)
        except hf.CheckpointError as e:
            raise ConfigError(f"judge.name: {e}") from None
    from spjax.data import pipeline  # (imports tensorflow_datasets, which the run reads its data with next)
    pipeline.check(cfg.data)
    tok = cfg.tokenizer_path or cfg.model_path
    if not tok:
        raise ConfigError("tokenizer_path: a random model needs a tokenizer (a path, or 'bytes')")
    if tok != "bytes" and not os.path.exists(tok):
        raise ConfigError(f"tokenizer_path: {tok} does not exist")


def _one_sample(cfg: Config) -> str:
    return (f"sampling.num_samples: the judge ranks K >= 2 samples per prompt, got {cfg.sampling.num_samples} "
            "(or set run.pairs=sampled to use it for evaluation only)")


def check_pairs(cfg: Config, source: str, n_train: int, echo):
    """Once the data is read: enough examples for a batch; the pair source said in one line."""
    s = cfg.sampling
    greedy = sampler.is_greedy(s.temperature)
    if not objectives.TABLE[cfg.objective.name].opponent:  # sft: each example's real response, whatever is asked
        source = "none"
    if source == "judged" and (greedy or s.top_k == 1):  # K equal samples: every prompt ties
        raise ConfigError(f"sampling.{'temperature' if greedy else 'top_k'}: greedy sampling gives "
                          f"the judge {s.num_samples} equal samples per prompt, so no pair to train on (sample, "
                          "e.g. sampling.temperature=1)")
    if source == "judged" and s.num_samples < 2:  # run.pairs=auto picked judged: the records carry no rejected
        raise ConfigError(_one_sample(cfg))
    if source != "judged" and cfg.judge.pairs != "best_worst":  # the judge scores held-out answers only
        raise ConfigError(f"judge.pairs: {cfg.judge.pairs!r} forms judged pairs, but this run's pairs are {source} "
                          "(the judge scores held-out answers only): drop it, or set run.pairs=judged")
    if source != "judged" and n_train < cfg.run.batch_size:  # one pair per example at most
        raise ConfigError(f"run.batch_size: {cfg.run.batch_size} is more than the {n_train} training "
                          "examples: no training step would run (lower it, or add data)")
    # Judged pairs: at most one a prompt (best_worst), or one per pair of its K samples (all). Fewer than a
    # batch in the best case: no round could ever train, and the run would export the initial model.
    most = n_train * (1 if cfg.judge.pairs == "best_worst" else s.num_samples * (s.num_samples - 1) // 2)
    if source == "judged" and most < cfg.run.batch_size:
        raise ConfigError(f"run.batch_size: {cfg.run.batch_size} is more than the {most} judged pairs the {n_train} "
                          f"training prompts can give at most (judge.pairs={cfg.judge.pairs}, sampling.num_samples="
                          f"{s.num_samples}): no training step would run (lower it, add data, or judge.pairs=all)")
    if source == "none":
        echo(f"pairs: none (objective.name={cfg.objective.name} trains on the real responses alone)")
    else:
        what = {"data": "the real response vs each record's rejected response",
                "sampled": "the real response vs the opponent's own sample",
                "judged": "the judge's preferred vs dispreferred of the opponent's samples"}[source]
        echo(f"pairs: {source} (run.pairs={cfg.run.pairs}): {what}; reference: "
             f"{'the initial model' if cfg.run.reference == 'initial' else 'the round opponent'}")
    if source in ("data", "sampled") and cfg.sampling.num_samples > 1:
        echo(f"note: sampling.num_samples={cfg.sampling.num_samples} serves judged pairs only; {source} pairs "
             "take one response per prompt")
    if cfg.judge.name:
        echo(f"judge: {cfg.judge.name}; pairs from {s.num_samples} samples per prompt: {cfg.judge.pairs}"
             if source == "judged" else f"judge: {cfg.judge.name} (held-out metrics only: "
             f"{'no pairs' if source == 'none' else 'pairs are ' + source})")


def check_examples(cfg: Config, source: str, train: list, held: list, echo):
    """Said once the data is tokenized: real responses the opponent's samples cannot match in length (a
    sample stops at sampling.max_new_tokens, with no end of turn: such a pair differs by length alone),
    and held-out prompts that are also trained on (held-out metrics would partly measure training data).
    Refused: data pairs whose held-out records lack a rejected response."""
    _check_held_pairs(cfg, source, held[:cfg.run.eval_examples] if cfg.run.eval_examples else held)
    cap = cfg.sampling.max_new_tokens
    longer = [len(e.real_ids) for e in train if len(e.real_ids) > cap]
    if source == "sampled" and longer:
        echo(f"note: {len(longer)} of {len(train)} real responses are longer than sampling.max_new_tokens="
             f"{cap} (up to {max(longer)} tokens), which the opponent's samples cannot reach: raise it, or lower "
             "data.max_len")
    trained = {e.prompt_ids.tobytes() for e in train}
    both = sum(e.prompt_ids.tobytes() in trained for e in held)
    if both:
        echo(f"note: {both} of {len(held)} held-out prompts are also training prompts (data.eval_path or a "
             "test/eval file repeats them): held-out metrics partly measure the training data")


def _check_held_pairs(cfg: Config, source: str, held: list):
    """Data pairs take each held-out record's rejected response as its second side too (held-out pairs,
    scored and evaluated each round): a held-out split without one (an SFT eval file beside preference
    training data) was a TypeError after round 0 had sampled and scored."""
    missing = [e for e in held if e.generated_ids is None] if source == "data" else []
    if missing:
        field = "data.eval_path" if cfg.data.eval_path else "data.path"
        raise ConfigError(f"{field}: run.pairs=data (chosen vs rejected) needs a rejected response in every held-out "
                          f"record too; {missing[0].source} has none ({len(missing)} of {len(held)} lack one): "
                          "give the held-out records one, or hold out part of the preference data (data.eval_frac)")


def check_lengths(cfg: Config, model_cfg, buckets, echo):
    """A sequence longer than the model's max_position_embeddings runs (RoPE extrapolates), but past the
    context it was trained on: said once, with what to lower."""
    longest = max(buckets[-1], cfg.data.max_prompt_len + max(cfg.sampling.max_new_tokens, cfg.run.eval_max_new_tokens))
    limit = model_cfg.max_position_embeddings
    if longest > limit and model_cfg.rope_type == "dynamic":
        raise ConfigError(f"data.max_len: sequences of up to {longest} tokens (data.max_len, data.max_prompt_len + "
                          f"sampling/eval new tokens) with dynamic rope scaling, which spjax computes only up to the "
                          f"model's max_position_embeddings={limit} (past it transformers rescales by the batch's "
                          f"longest sequence): lower them to {limit}")
    if longest > limit:
        echo(f"note: sequences of up to {longest} tokens (data.max_len, data.max_prompt_len + sampling/eval "
             f"new tokens) exceed the model's max_position_embeddings={limit}: positions past it were never trained")


def check_tokenizer(cfg: Config, tokenizer):
    """What makes every example fail the same way, said once about the tokenizer, not per example."""
    where = f"{'tokenizer_path' if cfg.tokenizer_path else 'model_path'}: {cfg.tokenizer_path or cfg.model_path}"
    if getattr(tokenizer, "eos_token", None) is None:
        raise ConfigError(f"{where}: the tokenizer names no EOS token to end responses with (tokenizer.json alone "
                          "does not: tokenizer_config.json or special_tokens_map.json is missing)")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict) and "default" not in template:
        raise ConfigError(f"{where}: the tokenizer has chat templates {sorted(template)} and none named 'default', "
                          "so none applies")


def check_held_out(cfg: Config, prepared, echo):
    """No held-out examples (data.eval_frac=0 without data.eval_path: NaN rows before, or every held-out
    record dropped): refused for run.keep_best, which picks by them; else said once."""
    if prepared.test:
        return
    held = prepared.reports["test"]  # a held-out split whose every record was dropped says so
    dropped = f"all {held.examples} held-out records were dropped: {held}; " if held.examples else ""
    if cfg.run.keep_best:
        raise ConfigError(f"run.keep_best={cfg.run.keep_best}: the data has no held-out examples to pick by "
                          f"({dropped}set data.eval_frac > 0 or data.eval_path)")
    echo(f"note: no held-out examples ({dropped or 'data.eval_frac=0, no data.eval_path'}): rounds log "
         "training metrics only")


def check_vocab(cfg: Config, model_cfg, tokenizer):
    """A tokenizer whose ids run past the model's embedding table (another model's tokenizer, or added
    tokens without a resized table) is refused: such an id's embedding is NaN, and the whole row with it."""
    n = max(tokenizer.get_vocab().values()) + 1
    if n > model_cfg.vocab_size:
        raise ConfigError(f"{'tokenizer_path' if cfg.tokenizer_path else 'model_path'}: the tokenizer "
                          f"({cfg.tokenizer_path or cfg.model_path or 'bytes'}) has ids up to {n - 1}, past the "
                          f"model's vocab_size {model_cfg.vocab_size}: it is not this model's tokenizer")
