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
        # the first minibatch of the first epoch: ratio exactly 1, no clipping, in both trainers
        assert r["first_minibatch"]["ratio_mean"] == 1.0 and r["first_minibatch"]["clip_fraction"] == 0.0
    for key in ("policy_loss", "entropy", "value_loss"):  # the same loss from fused ops and from full logits
        assert math.isclose(fused["first_minibatch"][key], materialised["first_minibatch"][key],
                            rel_tol=1e-5, abs_tol=1e-6), key
    text = ppo_update.format_report(report, args)
    assert "| fused " in text and "| materialised " in text and "tokens/s" in text
