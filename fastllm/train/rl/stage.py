"""The RL stage's entry points: the Python API behind `fastllm ppo`, its command line, and evaluation."""
from __future__ import annotations

import argparse
import copy
import json
import math
import os

import torch

from fastllm import ops

from ..chat import ChatTemplate, PromptExample, find_tokenizer, load_gpt, read_prompts
from ..config import add_config_arguments, config_from_args
from ..reward import ScalarHeadModel
from .config import PPOConfig
from .rewards import load_reward_fn
from .rollout import response_logprobs
from .trainer import PPOTrainer


@torch.no_grad()
def evaluate_policy(policy, prompts, reward_fn, *, template=None, ref_model=None, samples: int = 1,
                    max_new_tokens: int = 32, temperature: float = 1.0, seed: int = 0, batch_size: int = 64,
                    stop_token=None) -> dict:
    """The mean reward_fn score of `samples` sampled responses per prompt (temperature 0: greedy), the share
    that stopped, the mean response length, and with ref_model the mean per-sequence KL(policy || ref) (sum of
    k3 over the tokens)."""
    prompts = [p if isinstance(p, PromptExample) else PromptExample(list(p)) for p in prompts]
    stop = stop_token if stop_token is not None else (template.end_id if template else None)
    device = policy.lm_head_weight.device
    gen_seed = torch.Generator(device=device).manual_seed(seed)
    scores, stopped, kls, lengths = [], [], [], []
    batch = [p for p in prompts for _ in range(samples)]
    for start in range(0, len(batch), batch_size):
        chunk = batch[start:start + batch_size]
        out = policy.generate([p.prompt for p in chunk], max_new_tokens, temperature=temperature,
                              stop_tokens=() if stop is None else (stop,), generator=gen_seed)
        for p, r in zip(chunk, out.tokens):
            if template is not None:
                scores.append(float(reward_fn(p.text or template.decode_prompt(p.prompt),
                                              template.decode_response(r))))
            else:
                scores.append(float(reward_fn(p.prompt, list(r))))
        stopped.extend(out.stopped)
        lengths.extend(len(r) for r in out.tokens)
        if ref_model is not None and temperature > 0:
            ps, rs = [p.prompt for p in chunk], out.tokens
            lp = response_logprobs(policy, ps, rs, temperature)
            rp = response_logprobs(ref_model, ps, rs, temperature)
            kls.extend(k.sum().item() for k in ops.kl_penalty(lp, rp, "k3")[0].split([len(x) for x in rs]))
    scores_t = torch.tensor(scores)
    result = {"score": scores_t.mean().item(), "score_sem": (scores_t.std() / math.sqrt(len(scores))).item()
              if len(scores) > 1 else 0.0, "eos_rate": sum(stopped) / len(stopped), "n": len(scores),
              "mean_length": sum(lengths) / len(lengths)}
    if kls:
        result["kl"] = sum(kls) / len(kls)
    return result


def ppo(config: PPOConfig, *, prompts=None, init=None, policy=None, reward_model=None, reward_fn=None,
        reward_weights=None, tokenizer=None, ref_model=None) -> dict:
    """The Python API behind `fastllm ppo`: train `policy` (or the GPT under `init`) on `prompts` (a JSONL path
    or a list of PromptExample) against `reward_model` (a ScalarHeadModel or its folder) or `reward_fn` (one
    reward function or a list, with reward_weights). Returns the summary plus "final" (out_dir/final: the policy
    as a plain GPT with tokenizer.json) and "trainer"."""
    from fastllm.data import load_tokenizer

    from ..chat import export_model

    if policy is None:
        if init is None:
            raise ValueError("ppo needs policy= or init= (an SFT run folder or checkpoint)")
        policy = load_gpt(init)
    tokenizer_path = find_tokenizer(init, tokenizer) if (init is not None or tokenizer) else None
    template = ChatTemplate(load_tokenizer(tokenizer_path)) if tokenizer_path else None
    if isinstance(prompts, (str, os.PathLike)):
        if template is None:
            raise ValueError("reading a prompts file needs a tokenizer (init= or tokenizer=)")
        prompts = read_prompts(prompts, template, policy.config.block_size, config.max_new_tokens)
    if isinstance(reward_model, (str, os.PathLike)):
        reward_model = ScalarHeadModel.from_pretrained(reward_model)
    if config.resume:  # the checkpoint holds the reference: the policy is loaded over a copy of the initial one
        ref_model = ref_model if ref_model is not None else copy.deepcopy(policy)
    trainer = PPOTrainer(policy, config, prompts, reward_model=reward_model, reward_fn=reward_fn,
                         reward_weights=reward_weights, ref_model=ref_model, template=template,
                         extra_files={"tokenizer.json": str(tokenizer_path)} if tokenizer_path else None)
    summary = trainer.fit()
    if trainer.dist.is_main:
        summary["final"] = str(export_model(trainer.final_policy, config.out_dir, tokenizer_path))
    summary["trainer"] = trainer
    return summary


# --------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", required=True, help='JSONL file with a "prompt" field per line')
    parser.add_argument("--init", required=True, help="the policy to start from: an SFT run folder or checkpoint")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one next to --init)")
    reward = parser.add_mutually_exclusive_group(required=True)
    reward.add_argument("--reward-model", default=None, help="a `fastllm reward` run folder or export")
    reward.add_argument("--reward-fn", default=None, nargs="+", metavar="MODULE:FUNCTION",
                        help="one or more reward functions, function(prompt: str, response: str[, token_ids]) "
                             "-> float; with several, the reward is their weighted sum")
    parser.add_argument("--reward-weights", default=None, nargs="+", type=float,
                        help="one weight per --reward-fn (default: 1 each)")
    parser.add_argument("--out", dest="out_dir", default="runs/ppo", help="run folder (default: runs/ppo)")
    add_config_arguments(parser.add_argument_group("ppo"), PPOConfig, skip=("out_dir",))


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args, PPOConfig)
    if args.reward_weights is not None and not args.reward_fn:
        raise ValueError("--reward-weights applies to --reward-fn")
    summary = ppo(config, prompts=args.prompts, init=args.init, tokenizer=args.tokenizer,
                  reward_model=args.reward_model,
                  reward_fn=[load_reward_fn(spec) for spec in args.reward_fn] if args.reward_fn else None,
                  reward_weights=args.reward_weights)
    summary.pop("trainer", None)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary))
    return 0
