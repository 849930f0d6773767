"""More modules as users write them (no ensemble code): several inputs, a decoder input, mixup, dict outputs."""

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Seq2SeqTagger(L.LightningModule):
    """Batches ``(src, decoder_input, labels)``: the model takes two inputs that must stay aligned row by row."""

    def __init__(self, vocab: int = 8, dim: int = 16, lr: float = 2e-2):
        super().__init__()
        self.save_hyperparameters()
        self.model = _Seq2Seq(vocab, dim)

    def forward(self, src, decoder_input):
        return self.model(src, decoder_input)

    def training_step(self, batch, batch_idx):
        src, decoder_input, labels = batch
        logits = self(src, decoder_input)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        src, decoder_input, labels = batch
        logits = self(src, decoder_input)
        self.log("val_loss", F.cross_entropy(logits.flatten(0, 1), labels.flatten()))
        self.log("val_acc", (logits.argmax(-1) == labels).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class KeywordSeq2SeqTagger(Seq2SeqTagger):
    """Calls its model with keyword inputs only, as Hugging Face models are called."""

    def forward(self, src, decoder_input):
        return self.model(src=src, decoder_input=decoder_input)


class _Seq2Seq(nn.Module):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.src_embedding = nn.Embedding(vocab, dim)
        self.tgt_embedding = nn.Embedding(vocab, dim)
        self.head = nn.Sequential(nn.Linear(2 * dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, vocab))

    def forward(self, src, decoder_input):  # (B, T) token ids each -> (B, T, vocab)
        return self.head(torch.cat([self.src_embedding(src), self.tgt_embedding(decoder_input)], dim=-1))


def seq2seq_data(n: int = 256, length: int = 6, vocab: int = 8, seed: int = 0):
    """Synthetic tagging task: label = (src + decoder_input) mod vocab, position by position."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, vocab, (n, length), generator=g)
    dec = torch.randint(0, vocab, (n, length), generator=g)
    return src, dec, (src + dec) % vocab


class MixupClassifier(L.LightningModule):
    """Mixup inside training_step: a random permutation (torch) and mixing weight (NumPy) drawn before the forward."""

    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10))

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        perm = torch.randperm(x.shape[0])
        lam = float(np.random.beta(0.4, 0.4))
        logits = self(lam * x + (1 - lam) * x[perm])
        loss = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class DictOutputClassifier(MixupClassifier):
    """The model returns a dict (as Hugging Face models do): the callback cannot know which entry to ensemble."""

    def __init__(self):
        super().__init__()
        self.model = _DictOutputs()

    def forward(self, x):
        return self.model(x)["logits"]


class _DictOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        logits = self.body(x)
        return {"logits": logits, "hidden": logits.detach()}
