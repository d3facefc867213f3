#!/usr/bin/env python3
"""train_moe_lm.py: the multi-domain causal language model of examples/train_moe_lm.cc, written
as a PyTorch user would: an nn.Module whose sparse layers are ecss.torch.RREMoE, batches from a
small loader, torch.optim.Adam for the dense part; the ECSS session streams the experts through
a device cache smaller than them and updates them on the CPU.

Model: next-token prediction from the current token. Embedding [vocab, d] -> L residual RRE
sparse layers (each token routed by its domain's table) -> logits [d, vocab] -> cross-entropy.
Data: real text found on this machine, one domain per kind of file (C headers, Python sources,
licence texts, documentation, CMake files), split into words. At the end it prints the corpus's
unigram entropy beside the final loss (nats per token): a model that learned something from the
previous token ends below it.

Run from a build (PYTHONPATH=build/release/python) or after installing the module:
    /usr/bin/python3 examples/python/train_moe_lm.py --steps 300
"""

import argparse
import collections
import glob
import math
import os
import re
import time

import torch

import ecss
import ecss.torch as et

SAMPLES, SEQ, DOMAINS_PER_STEP = 8, 64, 4

# One domain per kind of text; each glob's files in sorted order, up to max_bytes per domain.
DOMAIN_GLOBS = {
    "c-headers": ["/usr/include/*.h", "/usr/include/*/*.h"],
    "python": ["/usr/lib/python3.11/*.py", "/usr/lib/python3/dist-packages/*/*.py"],
    "licenses": ["/usr/share/common-licenses/*"],
    "docs": ["/usr/share/doc/*/README*", "/usr/share/doc/*/*.txt"],
    "cmake": ["/usr/share/cmake*/Modules/*.cmake"],
}
WORD = re.compile(r"[A-Za-z_]+|[0-9]+|[^\sA-Za-z_0-9]")


def load_domains(max_bytes):
    """{domain: text} of the files found; a domain without files is left out."""
    texts = {}
    for name, patterns in DOMAIN_GLOBS.items():
        parts, size = [], 0
        for path in sorted(p for pattern in patterns for p in glob.glob(pattern)):
            if size >= max_bytes or not os.path.isfile(path):
                continue
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    text = f.read(max_bytes - size)
            except OSError:
                continue
            parts.append(text)
            size += len(text)
        if parts:
            texts[name] = "\n".join(parts)
    if len(texts) < 2:
        raise SystemExit("train_moe_lm: found fewer than two kinds of text on this machine")
    return texts


class Tokenizer:
    """Words and punctuation; the vocab - 1 most frequent, the rest one unknown id (0)."""

    def __init__(self, texts, vocab):
        counts = collections.Counter(w for t in texts for w in WORD.findall(t))
        self.ids = {w: i + 1 for i, (w, _) in enumerate(counts.most_common(vocab - 1))}
        self.vocab = len(self.ids) + 1

    def encode(self, text):
        return torch.tensor([self.ids.get(w, 0) for w in WORD.findall(text)], dtype=torch.int64)


class Batches:
    """Each step: SAMPLES sequences of SEQ tokens from DOMAINS_PER_STEP domains (rotating), and
    each sequence's domain id; every domain read on from where it stopped."""

    def __init__(self, streams):
        self.streams = streams
        self.cursor = [0] * len(streams)

    def next(self, step):
        tokens, domains = [], []
        for s in range(SAMPLES):
            d = (step + s % DOMAINS_PER_STEP) % len(self.streams)
            stream = self.streams[d]
            index = (self.cursor[d] + torch.arange(SEQ)) % len(stream)
            self.cursor[d] += SEQ
            tokens.append(stream[index])
            domains.append(d)
        return torch.stack(tokens), torch.tensor(domains)


class MoELanguageModel(torch.nn.Module):
    def __init__(self, experts, vocab, d_model, dtype):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d_model)
        torch.nn.init.uniform_(self.embed.weight, -0.5, 0.5)
        self.out = torch.nn.Linear(d_model, vocab, bias=False)
        bound = 1 / math.sqrt(d_model)
        torch.nn.init.uniform_(self.out.weight, -bound, bound)
        self.moe = torch.nn.ModuleList(
            et.RREMoE(experts, layer) for layer in range(experts.model.layers)
        )
        self.dtype = dtype  # the experts' (bf16 or f32); the dense part computes in f32

    def forward(self, tokens, domains):
        h = self.embed(tokens)
        for moe in self.moe:
            h = h + moe(h.to(self.dtype), tokens, domains).to(h.dtype)
        logits = self.out(h)
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--d-ff", type=int, default=128)
    parser.add_argument("--experts", type=int, default=4, help="per domain and layer")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    parser.add_argument("--strategy", default="ecss")
    parser.add_argument("--cache-fraction", type=float, default=0.6)
    parser.add_argument("--print-every", type=int, default=20)
    parser.add_argument("--trace", help="write a Chrome trace here at the end")
    args = parser.parse_args()
    torch.manual_seed(3)

    texts = load_domains(max_bytes=1 << 20)
    tokenizer = Tokenizer(texts.values(), args.vocab)
    streams = [tokenizer.encode(t) for t in texts.values()]
    for name, stream in zip(texts, streams):
        print(f"domain {name:<10} {len(stream):8d} tokens")
    unigram = torch.cat(streams).bincount(minlength=tokenizer.vocab).double()
    p = unigram[unigram > 0] / unigram.sum()
    unigram_entropy = float(-(p * p.log()).sum())

    spec = ecss.ModelSpec(
        layers=args.layers,
        d_model=args.d_model,
        d_ff=args.d_ff,
        domains=[ecss.DomainSpec(name, args.experts) for name in texts],
        vocab=tokenizer.vocab,
        dtype=args.dtype,
        seed=7,
        init_scale=0.5 / math.sqrt(args.d_model),
    )
    total_experts = args.layers * len(texts) * args.experts
    experts = et.Experts(
        spec,
        max_tokens_per_micro_batch=SAMPLES * SEQ,
        cache_experts=max(
            args.experts * min(len(texts), DOMAINS_PER_STEP),
            math.ceil(args.cache_fraction * total_experts),
        ),
        optimizer=ecss.OptimizerOptions(
            groups=[ecss.HyperParams(lr=3e-3)], skip_step_on_nonfinite=False
        ),
        strategy=args.strategy,
        trace=args.trace is not None,
    )
    print(
        f"{args.layers} sparse layers x {len(texts)} domains x {args.experts} experts = "
        f"{total_experts} experts of {spec.expert_params} params ({args.dtype}); device cache: "
        f"{experts.session.cache_slots} slots"
    )
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = MoELanguageModel(experts, tokenizer.vocab, args.d_model, dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = Batches(streams)

    print(f"{'step':>6} {'loss':>9} {'tokens/s':>10} {'streamed':>12} {'hit rate':>9} {'glue':>7}")
    losses, tokens_total, seconds_total, glue_total = [], 0, 0.0, 0.0
    for step in range(args.steps):
        start = time.perf_counter()
        tokens, domains = batches.next(step)
        optimizer.zero_grad(set_to_none=True)
        with experts.step([(tokens, domains)]) as handle:
            loss = model(tokens, domains)
            loss.backward()
        optimizer.step()
        seconds = time.perf_counter() - start
        stats = handle.stats.to_dict()
        # The binding's and the torch glue's share of the step (ecss.torch.Step).
        glue = handle.overhead_seconds / seconds
        losses.append(loss.item())
        if step >= 5:  # past the first steps' warm-up
            tokens_total += stats["tokens"]
            seconds_total += seconds
            glue_total += glue * seconds
        if step % args.print_every == 0 or step == args.steps - 1:
            print(
                f"{step:6d} {loss.item():9.4f} {stats['tokens'] / seconds:10.0f} "
                f"{stats['expert_fetch_bytes'] / 2**20:9.2f} MiB {stats['hit_rate']:9.2f} "
                f"{glue:6.1%}"
            )
    experts.session.synchronize()
    final = sum(losses[-30:]) / len(losses[-30:])
    print(
        f"final loss {final:.3f} nats/token (last 30 steps); unigram entropy "
        f"{unigram_entropy:.3f}; {tokens_total / max(seconds_total, 1e-9):.0f} tokens/s; "
        f"binding and glue {glue_total / max(seconds_total, 1e-9):.1%} of the steps"
    )
    if args.trace:
        experts.session.write_trace(args.trace)
        print(f"trace: {args.trace}")


if __name__ == "__main__":
    main()
