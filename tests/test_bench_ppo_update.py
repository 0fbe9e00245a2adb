"""bench/ppo_update.py on a tiny model: both trainers update on the same rollout, agree on the loss, and report."""
import math

from bench import ppo_update


def test_ppo_update_tiny():
    args = ppo_update.parse_args(["--vocab", "97", "--hidden", "16", "--layers", "1", "--heads", "2", "--batch", "3",
                                  "--prompt-len", "5", "--response-len", "7", "--minibatch", "2", "--rounds", "2"])
    report = ppo_update.run(args)
    assert report["tokens"] == 2 * 3 * 7  # epochs x prompts x response tokens (no stop token: full length)
    fused, materialised = (report["variants"][name] for name in ppo_update.VARIANTS)
    for r in (fused, materialised):
        assert r["median_s"] > 0 and r["tokens_per_s"] > 0
        assert r["first_minibatch"]["clip_fraction"] == 0.0
    # The first minibatch of the first epoch: the rollout's old log-probs are the fused trainer's own (the same ops
    # on the same weights: ratio exactly 1); the materialised trainer's come from full logits, which agree with
    # the fused kernels' to fp32 rounding, not to the bit (measured: a ratio mean of 1 + 2^-23).
    assert fused["first_minibatch"]["ratio_mean"] == 1.0
    assert math.isclose(materialised["first_minibatch"]["ratio_mean"], 1.0, rel_tol=0, abs_tol=1e-6)
    for key in ("policy_loss", "entropy", "value_loss"):  # the same loss from fused ops and from full logits
        assert math.isclose(fused["first_minibatch"][key], materialised["first_minibatch"][key],
                            rel_tol=1e-5, abs_tol=1e-6), key
    text = ppo_update.format_report(report, args)
    assert "| fused " in text and "| materialised " in text and "tokens/s" in text
