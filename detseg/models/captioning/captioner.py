"""The language half of DenseCap: a vocabulary of the training captions and an LSTM that writes one per region.

Johnson et al. (2016) condition a recurrent language model on each region: the region's code is the LSTM's first
input, a ``<start>`` token its second, and from then on every step reads the previous word and predicts the next,
until ``<end>``. Training feeds the true previous word (teacher forcing) and scores every prediction with
cross-entropy; at test time the model feeds its own words back, greedily (the arg-max each step) or keeping the
``beam`` best partial sentences.

The vocabulary is a plain list of words kept in the checkpoint (through the data info), so a trained model writes
captions for any image without the data it was trained on.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)            # ids 0..3, in this order
CONDITIONS = ("first", "every")               # where the region code enters the LSTM
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-case words: punctuation and spacing dropped ("A small, red star." -> [a, small, red, star])."""
    return _WORD.findall(str(text).lower())


class Vocabulary:
    """Words <-> ids: the four specials first, then the training captions' words seen at least ``min_count`` times.

    ``max_length`` caps a caption's words (longer ones are cut for training; generation stops there).
    """

    def __init__(self, words: Sequence[str], max_length: int = 16):
        self.words = list(SPECIALS) + [word for word in words if word not in SPECIALS]
        self.index = {word: i for i, word in enumerate(self.words)}
        self.max_length = int(max_length)

    pad, start, end, unknown = range(4)

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1, max_length: int = 16) -> "Vocabulary":
        counts = Counter(word for caption in captions for word in tokenize(caption))
        # Most frequent first, ties alphabetical: the same captions always give the same ids.
        words = sorted((word for word, count in counts.items() if count >= min_count),
                       key=lambda word: (-counts[word], word))
        return cls(words, max_length)

    def __len__(self) -> int:
        return len(self.words)

    def to_info(self) -> dict:
        return {"words": self.words[len(SPECIALS):], "max_length": self.max_length}

    @classmethod
    def from_info(cls, info: dict) -> "Vocabulary":
        return cls(info["words"], info["max_length"])

    def encode(self, caption: str) -> list[int]:
        """Word ids of a caption (unknown words -> ``<unk>``), at most ``max_length``; no ``<start>`` / ``<end>``."""
        return [self.index.get(word, self.unknown) for word in tokenize(caption)][:self.max_length]

    def targets(self, captions: Sequence[str], device=None) -> torch.Tensor:
        """(N, max_length + 1): each caption's ids then ``<end>``, padded with ``<pad>`` (0)."""
        rows = torch.full((len(captions), self.max_length + 1), self.pad, dtype=torch.long)
        for row, caption in zip(rows, captions):
            ids = self.encode(caption) + [self.end]
            row[:len(ids)] = torch.tensor(ids)
        return rows.to(device) if device is not None else rows

    def decode(self, ids: Iterable[int]) -> str:
        """Ids up to the first ``<end>`` -> a sentence; padding and ``<start>`` skipped."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end:
                break
            if i in (self.pad, self.start):
                continue
            words.append(self.words[i] if 0 <= i < len(self.words) else UNK)
        return " ".join(words)


class LSTMCaptioner(nn.Module):
    """``(region codes (R, D), captions (R, L+1)) -> logits (R, L+1, V)``; :meth:`generate` writes captions.

    Inputs per region: ``[code, <start>, w_1, ..., w_L]``; outputs from the second step on predict
    ``[w_1, ..., w_L, <end>]``. The code enters through a linear layer to the word-embedding size, so the LSTM
    sees the region the way it sees a word. ``condition="first"`` is DenseCap's: the code is the first input only,
    and the LSTM must carry it in its state; ``"every"`` also concatenates it to every step's input (as in
    "Show, Attend and Tell"-style decoders), so each word is predicted with the region in view.
    """

    def __init__(self, code_size: int, vocabulary_size: int, embed: int = 128, hidden: int = 256,
                 dropout: float = 0.0, condition: str = "first"):
        super().__init__()
        if condition not in CONDITIONS:
            raise ValueError(f"condition={condition!r}: expected one of {CONDITIONS}")
        self.condition = condition
        self.project = nn.Linear(code_size, embed)
        self.embed = nn.Embedding(vocabulary_size, embed, padding_idx=Vocabulary.pad)
        self.lstm = nn.LSTM(embed * (2 if condition == "every" else 1), hidden, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.words = nn.Linear(hidden, vocabulary_size)

    def _inputs(self, steps: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        """(R, T, E) step inputs -> what the LSTM reads: with ``condition="every"`` the code beside each."""
        if self.condition == "first":
            return steps
        return torch.cat([steps, projected[:, None].expand(-1, steps.shape[1], -1)], dim=2)   # (R, T, 2E)

    def _first_steps(self, codes: torch.Tensor):
        """Run the code and ``<start>``: the projected codes, the state after both steps and the first word's
        logits."""
        projected = self.project(codes)                                                    # (R, E)
        start = self.embed(codes.new_full((len(codes), 1), Vocabulary.start, dtype=torch.long))
        inputs = torch.cat([projected[:, None], start], dim=1)                             # (R, 2, E)
        outputs, state = self.lstm(self._inputs(inputs, projected))
        return projected, state, self.words(self.dropout(outputs[:, -1]))                  # (R, V)

    def forward(self, codes: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        projected = self.project(codes)                                                    # (R, E)
        words = self.embed(captions[:, :-1])                                               # (R, L, E)
        start = self.embed(captions.new_full((len(captions), 1), Vocabulary.start))
        inputs = torch.cat([projected[:, None], start, words], dim=1)                      # (R, L+2, E)
        outputs, _ = self.lstm(self._inputs(inputs, projected))
        return self.words(self.dropout(outputs[:, 1:]))                                    # (R, L+1, V)

    def loss(self, codes: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy per predicted word (``<end>`` included, padding not)."""
        if len(codes) == 0:
            return codes.sum() * 0.0 + sum(p.sum() * 0.0 for p in self.parameters())
        logits = self(codes, captions)
        return F.cross_entropy(logits.flatten(0, 1), captions.flatten(), ignore_index=Vocabulary.pad)

    @torch.no_grad()
    def generate(self, codes: torch.Tensor, max_length: int, beam: int = 1) -> torch.Tensor:
        """(R, D) codes -> (R, max_length + 1) word ids, each row ending in ``<end>`` (or cut at the length)."""
        if len(codes) == 0:
            return codes.new_zeros((0, max_length + 1), dtype=torch.long)
        if beam <= 1:
            return self._greedy(codes, max_length)
        return self._beam(codes, max_length, beam)

    def _greedy(self, codes: torch.Tensor, max_length: int) -> torch.Tensor:
        projected, state, logits = self._first_steps(codes)
        ids = codes.new_full((len(codes), max_length + 1), Vocabulary.pad, dtype=torch.long)
        done = torch.zeros(len(codes), dtype=torch.bool, device=codes.device)
        for step in range(max_length + 1):
            word = logits.argmax(1)                                                        # (R,)
            ids[:, step] = torch.where(done, Vocabulary.pad, word)
            done |= word == Vocabulary.end
            if bool(done.all()) or step == max_length:
                break
            outputs, state = self.lstm(self._inputs(self.embed(word)[:, None], projected), state)
            logits = self.words(outputs[:, 0])
        return ids

    def _beam(self, codes: torch.Tensor, max_length: int, beam: int) -> torch.Tensor:
        """Keep the ``beam`` most likely partial captions per region (sum of word log-probabilities); a finished
        caption stays in the beam with its score frozen. All regions' beams run as one batch of R x B."""
        count, device = len(codes), codes.device
        projected, (h, c), logits = self._first_steps(codes)
        vocabulary = logits.shape[1]
        log_probabilities = F.log_softmax(logits, 1)                                       # (R, V)
        scores, first = log_probabilities.topk(min(beam, vocabulary), dim=1)               # (R, B)
        beam = scores.shape[1]
        ids = codes.new_full((count, beam, max_length + 1), Vocabulary.pad, dtype=torch.long)
        ids[:, :, 0] = first
        done = first == Vocabulary.end                                                      # (R, B)
        h = h.repeat_interleave(beam, dim=1)                                               # (1, R B, H)
        c = c.repeat_interleave(beam, dim=1)
        projected = projected.repeat_interleave(beam, dim=0)                               # (R B, E)
        word = first.reshape(-1)
        for step in range(1, max_length + 1):
            if bool(done.all()):
                break
            outputs, (h, c) = self.lstm(self._inputs(self.embed(word)[:, None], projected), (h, c))
            step_log_probabilities = F.log_softmax(self.words(outputs[:, 0]), 1).view(count, beam, vocabulary)
            # A finished caption continues only with padding, at no cost, so it competes with its final score.
            finished = torch.full_like(step_log_probabilities, float("-inf"))
            finished[..., Vocabulary.pad] = 0.0
            step_log_probabilities = torch.where(done[..., None], finished, step_log_probabilities)
            candidates = (scores[..., None] + step_log_probabilities).view(count, -1)      # (R, B V)
            scores, chosen = candidates.topk(beam, dim=1)                                  # (R, B)
            parent, word = chosen // vocabulary, chosen % vocabulary
            ids = ids.gather(1, parent[..., None].expand_as(ids)).clone()
            ids[:, :, step] = word
            done = done.gather(1, parent) | (word == Vocabulary.end)
            rows = (parent + torch.arange(count, device=device)[:, None] * beam).reshape(-1)
            h, c, word, projected = h[:, rows], c[:, rows], word.reshape(-1), projected[rows]
        return ids[:, 0]                                                                   # best of each beam
