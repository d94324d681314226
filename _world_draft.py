"""Draft of the micro world (temporary; folded into train.py / data.py / encoder.py later)."""
import math, random, time, os, sys, io
import torch, torch.nn as nn, torch.nn.functional as F

# ---------------------------------------------------------------- FSC-style grammar (stand-in)
ACT = {"activate": ["turn on", "switch on", "activate", "start"],
       "deactivate": ["turn off", "switch off", "deactivate", "stop"],
       "increase": ["increase", "turn up", "raise"],
       "decrease": ["decrease", "turn down", "lower", "reduce"]}
OBJ_WORDS = {"lights": ["the lights", "lights"], "lamp": ["the lamp", "lamp"], "music": ["the music", "music"],
             "heat": ["the heat", "the heating", "the temperature"], "volume": ["the volume", "the sound"]}
LOC = {"kitchen": ["in the kitchen", "kitchen"], "bedroom": ["in the bedroom", "bedroom"],
       "washroom": ["in the washroom", "in the bathroom", "washroom"]}
INTENTS = ([("activate", "lamp", "none"), ("deactivate", "lamp", "none"), ("activate", "music", "none"),
            ("deactivate", "music", "none"), ("increase", "volume", "none"), ("decrease", "volume", "none")]
           + [(a, "lights", l) for a in ("activate", "deactivate") for l in ("none", "kitchen", "bedroom", "washroom")]
           + [(a, "heat", l) for a in ("increase", "decrease") for l in ("none", "kitchen", "bedroom", "washroom")]
           + [("bring", o, "none") for o in ("juice", "newspaper", "shoes", "socks")]
           + [("change language", o, "none") for o in ("none", "Chinese", "English", "German", "Korean")])
assert len(INTENTS) == 31


def phrasings(intent):
    a, o, l = intent
    out = []
    if a == "bring":
        for v in ["bring me", "get me", "fetch", "go get"]:
            for art in ["my", "the", "some"]:
                out.append(f"{v} {art} {o.lower()}")
    elif a == "change language":
        if o == "none":
            out = ["change language", "switch language", "change the language", "use a different language",
                   "language settings", "switch the language"]
        else:
            for v in ["change language to", "switch to", "set language to", "use", "i want"]:
                out.append(f"{v} {o}")
    else:
        for v in ACT[a]:
            for ow in OBJ_WORDS[o]:
                if l == "none":
                    out.append(f"{v} {ow}")
                else:
                    for lw in LOC[l]:
                        out.append(f"{v} {ow} {lw}")
                        out.append(f"{lw} {v} {ow}") if lw.startswith("in ") else None
    out = [s.lower() if not any(c.isupper() for c in s.split()[-1]) else s for s in out]
    return sorted(set(out))[:12]


PHR = {it: phrasings(it) for it in INTENTS}


def natural_label(it):
    return " ".join(it)


# arbitrary label words: ordinary words unrelated to the task
ARB = ("apple river stone cloud tiger violet copper maple falcon ocean pepper silver rabbit candle forest "
       "marble winter garden pencil rocket lemon orange thunder meadow bottle planet shadow crystal dragon "
       "banana castle mirror velvet anchor butter cotton desert island jungle kettle ladder magnet needle "
       "oyster parrot quartz saddle turtle umbrella walnut yellow zebra bamboo cherry donkey engine feather "
       "goblin hammer iceberg jacket kitten lizard monkey nickel olive panda quilt radish salmon tomato "
       "valley wizard yogurt puzzle circle square purple green blue red north south east west alpha beta "
       "gamma delta sigma omega one two three four five six seven eight nine ten").split()


def all_phrasing_words():
    return sorted({w for it in INTENTS for p in PHR[it] for w in p.split()})


# ---------------------------------------------------------------- text corpus
SEP = " =>"      # few-shot separator: "utterance => label"
COPY = " ="     # copy separator used by the KL objective: "t = t"  (TODO align with seal.py)


def episode(rng, arbitrary, n_way, shots):
    its = rng.sample(INTENTS, n_way)
    if arbitrary:
        labs = dict(zip(its, rng.sample(ARB, n_way)))
    else:
        labs = {it: natural_label(it) for it in its}
    lines = [(it, rng.choice(PHR[it])) for it in its for _ in range(shots)]
    rng.shuffle(lines)
    q = rng.choice(its)
    lines.append((q, rng.choice(PHR[q])))
    return "\n".join(f"{p}{SEP} {labs[it]}" for it, p in lines)


def copy_doc(rng):
    it = rng.choice(INTENTS)
    p = rng.choice(PHR[it])
    return f"{p}{COPY} {p}"


def random_repeat_doc(rng, vocab_words):
    n = rng.randint(3, 10)
    seq = " ".join(rng.choice(vocab_words) for _ in range(n))
    return f"{seq}{COPY} {seq}"


def document(rng, words):
    r = rng.random()
    if r < 0.6:
        return episode(rng, arbitrary=rng.random() < 0.5, n_way=rng.randint(2, 6), shots=rng.randint(1, 5))
    if r < 0.8:
        return copy_doc(rng)
    if r < 0.9:
        return random_repeat_doc(rng, words)
    it = rng.choice(INTENTS)
    return rng.choice(PHR[it])


# ---------------------------------------------------------------- tokenizer
def train_tokenizer(path_prefix, vocab_size=320, seed=0):
    import sentencepiece as spm
    rng = random.Random(seed)
    words = all_phrasing_words() + ARB
    lines = [document(rng, words) for _ in range(20000)]
    text = "\n".join(lines) + "\n" + "\n".join(words) + "\n"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.split("\n")), model_prefix=path_prefix, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, bos_id=-1, eos_id=0, unk_id=1, pad_id=-1,
        user_defined_symbols=["<nl>"], normalization_rule_name="identity", minloglevel=2, hard_vocab_limit=False,
    )
    sp = spm.SentencePieceProcessor(model_file=path_prefix + ".model")
    return sp


class Tok:
    def __init__(self, sp):
        self.sp = sp
        self.nl = sp.piece_to_id("<nl>")
        self.eot_id = sp.eos_id()
        self.vocab_size = sp.get_piece_size()

    def encode(self, s):
        out = []
        for i, line in enumerate(s.split("\n")):
            if i:
                out.append(self.nl)
            out += self.sp.encode(line)
        return out


# ---------------------------------------------------------------- GPT stand-in
class Block(nn.Module):
    def __init__(self, C, H):
        super().__init__()
        self.ln_1 = nn.LayerNorm(C); self.ln_2 = nn.LayerNorm(C)
        self.c_attn = nn.Linear(C, 3 * C); self.c_proj = nn.Linear(C, C); self.H = H
        self.fc = nn.Linear(C, 4 * C); self.proj = nn.Linear(4 * C, C)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, 2)
        q, k, v = (t.view(B, T, self.H, C // self.H).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class MiniGPT(nn.Module):
    def __init__(self, V, T, L, C, H):
        super().__init__()
        self.wte = nn.Embedding(V, C); self.wpe = nn.Embedding(T, C)
        self.h = nn.ModuleList(Block(C, H) for _ in range(L)); self.ln_f = nn.LayerNorm(C)
        self.apply(self._init)

    def _init(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx=None, inputs_embeds=None):
        x = self.wte(idx) if inputs_embeds is None else inputs_embeds
        x = x + self.wpe(torch.arange(x.shape[1]))
        for b in self.h:
            x = b(x)
        return self.ln_f(x) @ self.wte.weight.T


# ---------------------------------------------------------------- LM training
def batches(tok, rng, B, T, words):
    """Pack documents separated by eot into (B, T+1) windows."""
    buf = []
    while True:
        rows = []
        for _ in range(B):
            while len(buf) < T + 1:
                buf += tok.encode(document(rng, words)) + [tok.eot_id]
            rows.append(buf[:T + 1]); buf = buf[T + 1:]
        yield torch.tensor(rows)


@torch.no_grad()
def eval_text_icl(model, tok, rng, arbitrary, n_way, shots, n=200, phr_test=None):
    """N-way k-shot over the FSC intents, rank the N labels by summed log-prob."""
    model.eval()
    correct = 0
    for _ in range(n):
        its = rng.sample(INTENTS, n_way)
        labs = dict(zip(its, rng.sample(ARB, n_way))) if arbitrary else {it: natural_label(it) for it in its}
        demos = [(it, rng.choice(PHR[it])) for it in its for _ in range(shots)]
        rng.shuffle(demos)
        q = rng.choice(its)
        prompt = "".join(f"{p}{SEP} {labs[it]}\n" for it, p in demos) + f"{rng.choice(PHR[q])}{SEP}"
        pids = tok.encode(prompt)
        cands = [tok.encode(prompt + " " + labs[it] + "\n")[len(pids):] for it in its]
        # NOTE: check tokenization is prefix-stable
        L = max(len(c) for c in cands)
        x = torch.full((n_way, len(pids) + L), 0)
        for i, c in enumerate(cands):
            x[i, :len(pids) + len(c)] = torch.tensor(pids + c)
        logp = model(x[:, :-1]).log_softmax(-1)
        scores = []
        for i, c in enumerate(cands):
            tgt = torch.tensor(c)
            lp = logp[i, len(pids) - 1:len(pids) - 1 + len(c)].gather(1, tgt[:, None]).sum()
            scores.append(lp.item())
        correct += its[max(range(n_way), key=lambda i: scores[i])] == q
    model.train()
    return correct / n


def train_lm(steps=3000, B=32, T=256, L=4, C=128, H=4, lr=2e-3, seed=0, eval_every=250, vocab=320, n_eval=40):
    torch.manual_seed(seed)
    rng = random.Random(seed)
    os.makedirs("/tmp/world", exist_ok=True)
    sp = train_tokenizer("/tmp/world/sp", vocab)
    tok = Tok(sp)
    words = all_phrasing_words() + ARB
    model = MiniGPT(tok.vocab_size, 512, L, C, H)
    print("params", sum(p.numel() for p in model.parameters()) / 1e6, "M; vocab", tok.vocab_size, flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    gen = batches(tok, rng, B, T, words)
    t0 = time.time()
    for step in range(steps + 1):
        if step % eval_every == 0:
            erng = random.Random(123)
            accs = {f"{'arb' if a else 'nat'}{k}": eval_text_icl(model, tok, erng, a, 4, k, n=n_eval)
                    for a, k in ((0, 0), (0, 3), (1, 1), (1, 3), (1, 5))}
            torch.save(dict(model=model.state_dict(), cfg=(tok.vocab_size, 512, L, C, H), step=step), "/tmp/world/lm.pt")
            print(step, f"{time.time()-t0:.0f}s", " ".join(f"{k}={v:.2f}" for k, v in accs.items()), flush=True)
        if step == steps:
            break
        lr_t = lr * min(1, (step + 1) / 100) * (0.5 * (1 + math.cos(math.pi * step / steps)) * 0.9 + 0.1)
        for g in opt.param_groups:
            g["lr"] = lr_t
        x = next(gen)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
        if step % 50 == 0:
            print(f"  step {step} loss {loss.item():.3f} {time.time()-t0:.0f}s", flush=True)
    return model, tok


if __name__ == "__main__":
    torch.set_num_threads(1)
    import json
    kw = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    train_lm(**kw)


# ================================================================ speech side
def build_speech(n_train=12, n_test=4, seed=0):
    """(wav, text, intent, speaker, split) for every phrasing x voice."""
    import data
    voices = data.split_voices(n_train, 0, n_test, seed=seed)
    items, jobs = [], []
    rng = random.Random(seed)
    for split in ("train", "test"):
        for v in voices[split]:
            for it in INTENTS:
                for p in PHR[it]:
                    jobs.append((p, v, rng.randrange(1 << 30)))
                    items.append(dict(text=p, intent=it, speaker=v.speaker_id, split=split))
    wavs = data.synthesize_many(jobs, cache_dir="/tmp/world/synth", parallel=2, progress=True)
    for it, w in zip(items, wavs):
        it["wav"] = w
    return items


N_FFT = 512
WIN = 400   # 25 ms
HOP = 320   # 20 ms: one MFCC frame per HuBERT frame
N_MELS = 40
N_MFCC = 13


def hz_to_mel(f):
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def mel_filterbank(n_mels=N_MELS, n_fft=N_FFT, sr=16000, fmin=20.0, fmax=8000.0):
    mels = torch.linspace(hz_to_mel(torch.tensor(fmin)), hz_to_mel(torch.tensor(fmax)), n_mels + 2)
    hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    freqs = torch.linspace(0, sr / 2, n_fft // 2 + 1)
    lo, c, hi = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    up = (freqs[None] - lo) / (c - lo)
    down = (hi - freqs[None]) / (hi - c)
    return torch.clamp(torch.minimum(up, down), min=0.0)  # (n_mels, n_fft//2+1)


def dct_matrix(n_in=N_MELS, n_out=N_MFCC):
    n = torch.arange(n_in, dtype=torch.float64)
    k = torch.arange(n_out, dtype=torch.float64)[:, None]
    m = torch.cos(math.pi / n_in * (n + 0.5) * k) * math.sqrt(2.0 / n_in)
    m[0] /= math.sqrt(2.0)
    return m.float()  # (n_out, n_in), orthonormal DCT-II


def mfcc(wav):
    """(S,) -> (T, 39): 13 MFCC + deltas + delta-deltas, T = (S - 400) // 320 + 1 frames."""
    x = torch.cat([wav[:1], wav[1:] - 0.97 * wav[:-1]])
    frames = x.unfold(0, WIN, HOP) * torch.hamming_window(WIN, periodic=False)
    spec = torch.fft.rfft(frames, n=N_FFT).abs() ** 2
    mel = torch.log(spec @ mel_filterbank().T + 1e-6)
    c = mel @ dct_matrix().T
    d = deltas(c)
    return torch.cat([c, d, deltas(d)], 1)


def deltas(c, n=2):
    T = c.shape[0]
    p = torch.cat([c[:1].expand(n, -1), c, c[-1:].expand(n, -1)])
    num = sum(i * (p[n + i:n + i + T] - p[n - i:n - i + T]) for i in range(1, n + 1))
    return num / (2 * sum(i * i for i in range(1, n + 1)))


def kmeans(x, K, iters=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    # k-means++ init
    C = x[torch.randint(len(x), (1,), generator=g)]
    for _ in range(K - 1):
        d = torch.cdist(x, C).min(1).values ** 2
        C = torch.cat([C, x[torch.multinomial(d / d.sum(), 1, generator=g)]])
    for _ in range(iters):
        a = torch.cdist(x, C).argmin(1)
        C = torch.zeros_like(C).index_add_(0, a, x) / torch.bincount(a, minlength=K).clamp(min=1)[:, None].float()
    return C


def span_mask(B, T, lengths, p=0.08, span=10, g=None):
    starts = (torch.rand(B, T, generator=g) < p) & (torch.arange(T)[None] < lengths[:, None])
    m = torch.zeros(B, T + span, dtype=torch.bool)
    for s in range(span):
        m[:, s:s + T] |= starts
    return m[:, :T] & (torch.arange(T)[None] < lengths[:, None])


def load_items(split_voices, phr_per_intent=None, seed=0, n_train=12, n_test=4):
    """Like build_speech but for a subset; split_voices = {'train': idx list, 'test': idx list}."""
    import data
    voices = data.split_voices(n_train, 0, n_test, seed=seed)
    rng = random.Random(seed)
    items, jobs = [], []
    for split in ("train", "test"):
        for vi, v in enumerate(voices[split]):
            for it in INTENTS:
                for pi, p in enumerate(PHR[it]):
                    s = rng.randrange(1 << 30)
                    if vi in split_voices.get(split, ()) and (phr_per_intent is None or pi < phr_per_intent):
                        jobs.append((p, v, s))
                        items.append(dict(text=p, intent=it, speaker=v.speaker_id, split=split))
    wavs = data.synthesize_many(jobs, cache_dir="/tmp/world/synth", parallel=2, progress=True)
    for it, w in zip(items, wavs):
        it["wav"] = w
    return items


def hubert_cfg():
    from encoder import HuBERTConfig
    return HuBERTConfig(conv_dim=(32, 64, 128, 128, 128), conv_kernel=(10, 4, 4, 4, 2), conv_stride=(5, 4, 4, 2, 2),
                        pos_conv_kernel=16, pos_conv_groups=4, n_embd=128, n_layer=3,
                        n_head=4, n_inner=256)


def pretrain_hubert(items, K=64, steps=600, B=16, lr=1e-3, seed=0, log_every=25):
    from encoder import HuBERT
    from data import collate
    torch.manual_seed(seed)
    t0 = time.time()
    feats = [mfcc(it["wav"]) for it in items]
    allf = torch.cat(feats)
    mu, sd = allf.mean(0), allf.std(0)
    sub = allf[torch.randperm(len(allf))[:20000]]
    C = kmeans((sub - mu) / sd, K)
    labels = [torch.cdist((f - mu) / sd, C).argmin(1) for f in feats]
    print(f"mfcc+kmeans {time.time()-t0:.0f}s frames {len(allf)}", flush=True)
    model = HuBERT(hubert_cfg(), masked_pretraining=True)
    head = nn.Linear(model.config.n_embd, K)
    params = list(model.parameters()) + list(head.parameters())
    print("hubert params", sum(p.numel() for p in params) / 1e6, flush=True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        lr_t = lr * min(1, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for gr in opt.param_groups:
            gr["lr"] = lr_t
        idx = torch.randint(len(items), (B,), generator=g).tolist()
        wavs = [items[i]["wav"] for i in idx]
        lengths = torch.tensor([len(w) for w in wavs])
        wav = nn.utils.rnn.pad_sequence(wavs, batch_first=True)
        fl = model.frame_lengths(lengths)
        T = int(fl.max())
        mask = span_mask(B, T, fl, p=0.08, span=10, g=g)
        h, _ = model(wav, lengths, mask_time_indices=mask)
        lab = nn.utils.rnn.pad_sequence([labels[i][:T] for i in idx], batch_first=True, padding_value=-100)
        lab = lab[:, :T]
        logits = head(h[mask])
        loss = F.cross_entropy(logits, lab[mask], ignore_index=-100)
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
        if step % log_every == 0:
            acc = (logits.argmax(-1) == lab[mask]).float().mean().item()
            print(f"hubert step {step} loss {loss.item():.3f} acc {acc:.3f} mask {mask.float().mean():.2f} {time.time()-t0:.0f}s", flush=True)
    return model.eval()


# ================================================================ Seal in the world
def to_gpt(path="/tmp/world/lm.pt"):
    from decoder import GPT, GPTConfig
    ck = torch.load(path, weights_only=True)
    V, T, L, C, H = ck["cfg"]
    g = GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=L, n_head=H, n_embd=C))
    sd = {}
    for k, v in ck["model"].items():
        k = (k.replace(".c_attn.", ".attn.c_attn.").replace(".c_proj.", ".attn.c_proj.")
             .replace(".fc.", ".mlp.c_fc.").replace(".proj.", ".mlp.c_proj."))
        sd[k] = v
    g.load_state_dict(sd)
    return g.eval()


@torch.no_grad()
def encode_items(hubert, items, layer=-1, B=32):
    out = []
    for i in range(0, len(items), B):
        wavs = [it["wav"] for it in items[i:i + B]]
        lengths = torch.tensor([len(w) for w in wavs])
        _, fl, hs = hubert(nn.utils.rnn.pad_sequence(wavs, batch_first=True), lengths, output_hidden_states=True)
        for b in range(len(wavs)):
            out.append(hs[layer][b, :fl[b]].clone())
    return out


def train_projector(gpt, tok, feats, items, loss="kl", steps=300, B=16, lr=1e-3, rate=8, seed=0, log_every=50,
                    sep=COPY, hidden=256):
    from projector import Projector, ProjectorConfig
    from seal import Seal, SealConfig
    torch.manual_seed(seed)
    pc = ProjectorConfig(in_dim=feats[0].shape[1], out_dim=gpt.config.n_embd, rate=rate, hidden_dim=hidden)
    seal = Seal(nn.Identity(), Projector(pc), gpt, tok, SealConfig(separator=sep, loss=loss, projector=pc))
    if steps == 0:
        return seal
    opt = torch.optim.AdamW(seal.projector.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    ids = [tok.encode(it["text"]) for it in items]
    t0 = time.time()
    for step in range(steps):
        for gr in opt.param_groups:
            gr["lr"] = lr * min(1, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(len(items), (B,), generator=g).tolist()
        f = nn.utils.rnn.pad_sequence([feats[i] for i in idx], batch_first=True)
        lengths = torch.tensor([len(feats[i]) for i in idx])
        l, n = seal.loss(f, lengths, [ids[i] for i in idx])
        opt.zero_grad(); l.backward(); opt.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"{loss} step {step} loss {l.item():.3f} {time.time()-t0:.0f}s", flush=True)
    return seal


@torch.no_grad()
def eval_fewshot(seal, tok, train_items, train_feats, test_items, test_feats, mode, arbitrary, k, n_way=4,
                 n=100, seed=0):
    """N-way k-shot: demos from train voices, query from test voices; rank the N labels."""
    from seal import build_prompt
    rng = random.Random(seed)
    by_int = {}
    for i, it in enumerate(train_items):
        by_int.setdefault(it["intent"], []).append(i)
    seal.eval()
    sep = tok.encode(SEP)

    def span(items, feats, i):
        if mode == "text":
            return tok.encode(items[i]["text"])
        return seal.speech_embeds(feats[i][None], torch.tensor([len(feats[i])]))[0]

    correct = 0
    qs = rng.sample(range(len(test_items)), n)
    for qi in qs:
        q = test_items[qi]["intent"]
        its = [q] + rng.sample([x for x in INTENTS if x != q], n_way - 1)
        labs = dict(zip(its, rng.sample(ARB, n_way))) if arbitrary else {it: natural_label(it) for it in its}
        demos = [(it, d) for it in its for d in rng.sample(by_int[it], k)]
        rng.shuffle(demos)
        prefix = []
        for it, d in demos:
            prefix += [span(train_items, train_feats, d), sep, tok.encode(" " + labs[it] + "\n")]
        prefix += [span(test_items, test_feats, qi), sep]
        cands = [tok.encode(" " + labs[it]) for it in its]
        rows = [prefix + [c] for c in cands]
        p = build_prompt(rows, seal.decoder.wte)
        logits = seal.decoder(inputs_embeds=p.embeds)
        logp = logits.log_softmax(-1).reshape(-1, logits.shape[-1])
        idx = p.predicting(len(prefix))
        tgt = torch.cat([torch.tensor(c) for c in cands])
        lp = logp[idx, tgt]
        scores = torch.stack([s.sum() for s in lp.split([len(c) for c in cands])])
        correct += int(scores.argmax()) == 0
    return correct / n


# ================================================================ v2: corpus from data.fsc_grammar, decoder.GPT
import data as _data
G = _data.fsc_grammar()
GI = G.intents          # Intent(label, fields, templates)
SEP2 = " =>"            # fewshot.py's DEFAULT_TEMPLATE "{input} => {label}\n"
COPY2 = " ="            # the Seal copy separator


def utt(s):
    return s[0].upper() + s[1:]   # transcriptions in the FSC CSV start with a capital


def lines_doc(rng, pairs):
    """[(utterance, label)] -> segments"""
    segs = []
    for u, l in pairs:
        segs += [utt(u), SEP2, " " + l + "\n"]
    return segs


def doc2(rng):
    r = rng.random()
    if r < 0.55:  # N-way k-shot episode, natural or arbitrary labels
        n_way = rng.randint(2, 6)
        shots = rng.randint(0, 5)
        its = rng.sample(GI, n_way)
        labs = (dict(zip(range(n_way), rng.sample(ARB, n_way))) if rng.random() < 0.5
                else {i: it.label for i, it in enumerate(its)})
        pairs = [(rng.choice(its[i].templates), labs[i]) for i in range(n_way) for _ in range(shots)]
        rng.shuffle(pairs)
        q = rng.randrange(n_way)
        pairs.append((rng.choice(its[q].templates), labs[q]))
        return lines_doc(rng, pairs)
    if r < 0.65:  # random natural-label lines (31-way, like fewshot.py's default protocol)
        its = [rng.choice(GI) for _ in range(rng.randint(1, 8))]
        return lines_doc(rng, [(rng.choice(it.templates), it.label) for it in its])
    if r < 0.85:  # copy: "t = t", the Seal KL target
        t = utt(rng.choice(rng.choice(GI).templates))
        return [t, COPY2, " " + t + "\n"]
    if r < 0.93:  # random word sequence repeated: generic induction
        words = rng.sample(ALLW, rng.randint(2, 9))
        s = " ".join(words)
        return [s, COPY2, " " + s + "\n"]
    return [utt(rng.choice(rng.choice(GI).templates)) + "\n" for _ in range(rng.randint(1, 4))]


ALLW = sorted({w for it in GI for t in it.templates for w in t.split()} | set(ARB))


def train_tok2(prefix, seed=0):
    import sentencepiece as spm
    rng = random.Random(seed)
    docs = ["".join(doc2(rng)) for _ in range(20000)]
    docs = [l for d in docs for l in d.split("\n") if l]
    docs += [" ".join(ARB)] + [utt(t) for it in GI for t in it.templates]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_prefix=prefix, vocab_size=700, model_type="bpe",
        character_coverage=1.0, bos_id=-1, eos_id=0, unk_id=1, pad_id=-1, normalization_rule_name="identity",
        minloglevel=2, hard_vocab_limit=False, user_defined_symbols=["\n"])
    from decoder import SentencePieceTokenizer
    return SentencePieceTokenizer(prefix + ".model")


def enc_doc(tok, segs):
    return [i for s in segs for i in tok.encode(s)]


def batches2(tok, rng, B, T):
    buf = []
    while True:
        rows = []
        for _ in range(B):
            while len(buf) < T + 1:
                buf += enc_doc(tok, doc2(rng)) + [tok.eot_id]
            rows.append(buf[:T + 1]); buf = buf[T + 1:]
        yield torch.tensor(rows)


@torch.no_grad()
def eval_text2(model, tok, rng, arbitrary, n_way, shots, n=50):
    model.eval()
    correct = 0
    for _ in range(n):
        its = rng.sample(GI, n_way)
        labs = rng.sample(ARB, n_way) if arbitrary else [it.label for it in its]
        pairs = [(rng.choice(its[i].templates), labs[i]) for i in range(n_way) for _ in range(shots)]
        rng.shuffle(pairs)
        q = rng.randrange(n_way)
        pids = enc_doc(tok, lines_doc(rng, pairs) + [utt(rng.choice(its[q].templates)), SEP2])
        cands = [tok.encode(" " + l + "\n") for l in labs]
        L = max(len(c) for c in cands)
        x = torch.zeros(n_way, len(pids) + L, dtype=torch.long)
        for i, c in enumerate(cands):
            x[i, :len(pids) + len(c)] = torch.tensor(pids + c)
        logp = model(x[:, :-1]).log_softmax(-1)
        sc = [logp[i, len(pids) - 1:len(pids) - 1 + len(c)].gather(1, torch.tensor(c)[:, None]).sum().item()
              for i, c in enumerate(cands)]
        correct += max(range(n_way), key=lambda i: sc[i]) == q
    model.train()
    return correct / n


def train_lm2(steps=3000, B=8, T=320, L=3, C=128, H=4, lr=3e-3, seed=0, eval_every=200, n_eval=40, out="/tmp/world/lm2"):
    from decoder import GPT, GPTConfig
    torch.manual_seed(seed)
    rng = random.Random(seed)
    os.makedirs(out, exist_ok=True)
    tok = train_tok2(out + "/tokenizer")
    model = GPT(GPTConfig(block_size=512, vocab_size=tok.vocab_size, n_layer=L, n_head=H, n_embd=C,
                          bos_token_id=tok.eot_id, eos_token_id=tok.eot_id))
    print("params", sum(p.numel() for p in model.parameters()) / 1e6, "M; vocab", tok.vocab_size, flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    gen = batches2(tok, rng, B, T)
    t0 = time.time()
    for step in range(steps + 1):
        if step % eval_every == 0:
            erng = random.Random(123)
            accs = {f"{'arb' if a else 'nat'}{k}": eval_text2(model, tok, erng, a, 4, k, n=n_eval)
                    for a, k in ((0, 0), (0, 3), (1, 1), (1, 3), (1, 5))}
            print(step, f"{time.time()-t0:.0f}s", " ".join(f"{k}={v:.2f}" for k, v in accs.items()), flush=True)
            model.save_pretrained(out, extra_files={"tokenizer.model": open(out + "/tokenizer.model", "rb").read()})
        if step == steps:
            break
        lr_t = lr * min(1, (step + 1) / 100) * (0.5 * (1 + math.cos(math.pi * step / steps)) * 0.9 + 0.1)
        for g in opt.param_groups:
            g["lr"] = lr_t
        x = next(gen)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
        if step % 50 == 0:
            print(f"  step {step} loss {loss.item():.3f} {time.time()-t0:.0f}s", flush=True)
    return model, tok
