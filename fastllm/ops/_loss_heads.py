"""The scalar losses of fused_linear.py as chunk heads: each turns a chunk's row statistics (lse, z[label], sum(z),
entropy) into its share of the loss and the chunk's gradient coefficients (softmax.stat_gradient_coefficients),
which _chunked_head.run_chunks applies in the same pass."""
import torch

from . import rl
from ._chunked_head import even_ranges, row_chunks, rows_of, sequence_chunks
from .softmax import stat_gradient_coefficients


def cross_entropy_rows(lse, target, sum_z, label_smoothing, vocab):
    """Per-row cross-entropy: (1 - s)(lse - z[label]) + s (lse - mean(z)), as F.cross_entropy smooths labels."""
    loss = lse - target  # fp64 (lse is), rounded to fp32 once
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - sum_z / vocab)
    return loss.float()


class CrossEntropyHead:
    want_entropy = False

    def __init__(self, rows, most, labels, ignore_index, label_smoothing, vocab, mean):
        self.chunks = row_chunks(rows, most)
        self.ignore_index, self.smoothing, self.vocab = ignore_index, label_smoothing, vocab
        self.want_sum = label_smoothing > 0
        count = (labels != ignore_index).sum(dtype=torch.float32)
        self.denominator = count if mean else torch.ones_like(count)  # a mean over no label is 0/0, as in torch
        self.total = torch.zeros((), dtype=torch.float32, device=labels.device)

    def __call__(self, index, ranges, labels, lse, target, sum_z, entropy):
        valid = labels != self.ignore_index
        self.total += torch.where(valid, cross_entropy_rows(lse, target, sum_z, self.smoothing, self.vocab), 0.0).sum()
        weight = torch.where(valid, 1.0 / self.denominator, 0.0)  # d loss / d row loss
        smoothing = self.smoothing
        return stat_gradient_coefficients(labels, self.ignore_index, entropy, g_lse=weight,
                                          g_target=-(1.0 - smoothing) * weight,
                                          g_sum=-(smoothing / self.vocab) * weight if smoothing else None)

    def result(self):
        return self.total / self.denominator, self.total.new_empty(0)


class PolicyHead:
    """PPO (rl.policy_terms) on the chunk's log-probs; entropy is always computed, for the statistics. The loss is
    sum_t w_t l_t with the per-token weights of the aggregation mode (rl.token_weights, computed by the caller);
    with cu_seqlens the chunks are runs of whole sequences (GSPO's sequence ratio needs all of a sequence)."""
    want_sum, want_entropy = False, True
    # the loss, then the statistics (rl.policy_stat_pieces, each a masked token mean): clip fraction, approx KL,
    # ratio, entropy, KL to the reference, low and high clip fractions
    n_sums = 8

    def __init__(self, rows, most, labels, old_logprobs, advantages, mask, weights, ref_logprobs, cu_seqlens,
                 ignore_index, clip_low, clip_high, dual_clip, kl_coef, kl_estimator, kl_clamp, entropy_coef,
                 ratio_level):
        self.sequences = None
        if cu_seqlens is None:
            self.chunks = row_chunks(rows, most)
        else:
            self.chunks = sequence_chunks(cu_seqlens.tolist(), most)
            self.sequences = rl.Sequences.from_cu_seqlens(cu_seqlens, rows)
        self.old_logprobs, self.advantages, self.ref_logprobs = old_logprobs, advantages, ref_logprobs
        self.mask = torch.where(labels != ignore_index, mask, 0.0)  # an ignored label is no token of the loss
        self.weights = weights
        self.denominator = rl.mask_denominator(self.mask)
        self.ignore_index = ignore_index
        self.policy = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
                           kl_estimator=kl_estimator, kl_clamp=kl_clamp, entropy_coef=entropy_coef,
                           ratio_level=ratio_level)
        self.entropy_coef = entropy_coef
        self.sums = torch.zeros(self.n_sums, dtype=torch.float32, device=labels.device)

    def _chunk_sequences(self, ranges):
        if self.sequences is None:
            return None
        ids = rows_of(self.sequences.ids, ranges)
        first = int(ids[0]) if ids.numel() else 0
        return rl.Sequences(ids - first, int(ids[-1]) - first + 1 if ids.numel() else 0)

    def __call__(self, index, ranges, labels, lse, target, sum_z, entropy):
        mask, weights = rows_of(self.mask, ranges), rows_of(self.weights, ranges)
        logprobs = torch.where(labels != self.ignore_index, (target - lse).float(), 0.0)
        ref_logprobs = None if self.ref_logprobs is None else rows_of(self.ref_logprobs, ranges)
        terms = rl.policy_terms(logprobs, rows_of(self.old_logprobs, ranges), rows_of(self.advantages, ranges),
                                entropy=entropy, ref_logprobs=ref_logprobs, mask=mask,
                                sequences=self._chunk_sequences(ranges), weights=weights, with_derivative=True,
                                **self.policy)
        self.sums[0] += rl.masked_sum(terms.loss, weights)
        self.sums[1:] += torch.stack([rl.masked_sum(piece, mask) for piece in rl.policy_stat_pieces(terms, entropy)])
        g_logprobs = torch.where(mask != 0, terms.dloss_dlogprobs, 0.0)  # padding may be NaN
        g_entropy = -self.entropy_coef * weights if self.entropy_coef else None
        return stat_gradient_coefficients(labels, self.ignore_index, entropy, g_lse=-g_logprobs,
                                          g_target=g_logprobs, g_entropy=g_entropy)

    def result(self):
        stats = self.sums[1:] / self.denominator
        return self.sums[0].clone(), stats  # a custom op's outputs are fresh tensors, not views


class PreferenceHead:
    """DPO (rl.preference_losses) over sequence log-probs; a chunk is a run of whole pairs. Token rows are
    [chosen sequences (pairs x chosen_length); rejected sequences (pairs x rejected_length)]."""
    want_sum, want_entropy = False, False

    def __init__(self, most, labels, ref_chosen, ref_rejected, chosen_length, ignore_index, beta, loss_type,
                 label_smoothing):
        pairs = ref_chosen.shape[0]
        self.lengths = (chosen_length, (labels.shape[0] - pairs * chosen_length) // pairs)
        self.pair_ranges = even_ranges(pairs, max(1, most // sum(self.lengths)))
        rejected_start = pairs * chosen_length
        chosen_length, rejected_length = self.lengths
        self.chunks = [((first * chosen_length, last * chosen_length),
                        (rejected_start + first * rejected_length, rejected_start + last * rejected_length))
                       for first, last in self.pair_ranges]
        self.pairs, self.ref_chosen, self.ref_rejected = pairs, ref_chosen, ref_rejected
        self.ignore_index, self.beta = ignore_index, beta
        self.preference = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
        self.total = torch.zeros((), dtype=torch.float32, device=labels.device)
        self.rewards = torch.empty(2, pairs, dtype=torch.float32, device=labels.device)

    def __call__(self, index, ranges, labels, lse, target, sum_z, entropy):
        first, last = self.pair_ranges[index]
        count = last - first
        chosen_length, rejected_length = self.lengths
        valid = labels != self.ignore_index
        logprobs = torch.where(valid, (target - lse).float(), 0.0)
        chosen = logprobs[:count * chosen_length].view(count, chosen_length).sum(1)
        rejected = logprobs[count * chosen_length:].view(count, rejected_length).sum(1)
        ref_chosen, ref_rejected = self.ref_chosen[first:last], self.ref_rejected[first:last]
        losses, dloss_du = rl.preference_losses(chosen, rejected, ref_chosen, ref_rejected, with_derivative=True,
                                                **self.preference)
        self.total += losses.sum()
        self.rewards[0, first:last] = self.beta * (chosen - ref_chosen)
        self.rewards[1, first:last] = self.beta * (rejected - ref_rejected)
        per_pair = dloss_du / self.pairs  # u = (chosen - ref) - (rejected - ref): +1 for chosen, -1 for rejected
        g_logprobs = torch.cat([per_pair.repeat_interleave(chosen_length),
                                -per_pair.repeat_interleave(rejected_length)])
        g_logprobs = torch.where(valid, g_logprobs, 0.0)
        return stat_gradient_coefficients(labels, self.ignore_index, entropy, g_lse=-g_logprobs,
                                          g_target=g_logprobs)

    def result(self):
        return self.total / self.pairs, self.rewards.reshape(-1)
