"""RetroMAE's objective: encoder MLM loss + decoder reconstruction loss, with accuracies to watch.

Both sides are token-level cross-entropy through the same (tied) MLM head. The two accuracies
are the stopping signal users asked for: the encoder's saturates early, the decoder's keeps
rising while ``h`` still learns to carry more of the text.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ember_train.models.retromae import RetroMAEOutput


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and accuracy over ``[N, V]`` logits; an empty selection gives a zero loss
    that still carries a (zero) gradient, instead of NaN."""
    if targets.numel() == 0:
        zero = logits.sum() * 0.0
        return zero, zero.detach()
    loss = F.cross_entropy(logits.float(), targets)
    accuracy = (logits.detach().argmax(dim=-1) == targets).float().mean()
    return loss, accuracy


class RetroMAELoss:
    """``encoder_weight * MLM(encoder) + decoder_weight * CE(decoder)``; returns the loss and metrics.

    Metric names: ``enc_mlm_loss``, ``dec_mlm_loss``, ``enc_mlm_acc``, ``dec_mlm_acc`` (the loop
    logs them averaged over each log window, next to the weighted total ``loss``). A model without
    a decoder (MLM only) gives ``encoder_weight * MLM(encoder)`` and no ``dec_*`` metrics.
    """

    def __init__(self, encoder_weight: float = 1.0, decoder_weight: float = 1.0) -> None:
        if encoder_weight < 0 or decoder_weight < 0 or encoder_weight + decoder_weight == 0:
            raise ValueError("loss weights must be >= 0 and not both 0")
        self.encoder_weight = encoder_weight
        self.decoder_weight = decoder_weight

    def __call__(self, output: RetroMAEOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        enc_loss, enc_acc = token_cross_entropy(output.encoder_logits, output.encoder_targets)
        if output.decoder_logits is None:
            return self.encoder_weight * enc_loss, {"enc_mlm_loss": enc_loss.detach(), "enc_mlm_acc": enc_acc}
        dec_loss, dec_acc = token_cross_entropy(output.decoder_logits, output.decoder_targets)
        loss = self.encoder_weight * enc_loss + self.decoder_weight * dec_loss
        # 0-d tensors, not floats: the training loop reads them with the loss, once per step.
        metrics = {
            "enc_mlm_loss": enc_loss.detach(),
            "dec_mlm_loss": dec_loss.detach(),
            "enc_mlm_acc": enc_acc,
            "dec_mlm_acc": dec_acc,
        }
        return loss, metrics
