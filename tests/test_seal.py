"""Seal: prompt building from segments, teacher/student losses, freezing, projector checkpoints."""
import pytest
import torch
import torch.nn.functional as F

from decoder import GPT, GPTConfig
from encoder import HuBERT, HuBERTConfig
from projector import Projector, ProjectorConfig, kl_loss
from seal import Seal, SealConfig, build_prompt


class CharTokenizer:
    """A stand-in tokenizer: one id per character (enough to exercise the plumbing)."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 100 + 1 for c in text]


def tiny_seal(loss: str = "kl", encoder_layer: int = -1, lines: int = 1) -> Seal:
    lm = GPT(GPTConfig.preset("gpt2-tiny"))
    enc = HuBERT(HuBERTConfig.preset("hubert-tiny"))
    proj = Projector(ProjectorConfig(in_dim=64, out_dim=64, rate=2, hidden_dim=32))
    cfg = SealConfig(encoder="tiny-hubert", lm="tiny-lm", encoder_layer=encoder_layer, loss=loss,
                     lines=lines, projector=proj.config)
    return Seal(enc, proj, lm, CharTokenizer(), cfg)


def test_build_prompt_layout_and_batch_equals_items():
    seal = tiny_seal()
    speech = torch.randn(3, 64)
    rows = [[[5, 6], speech, [7]], [[8], [9, 10, 11]]]
    p = seal.prompt(rows)
    assert p.embeds.shape == (2, 6, 64)
    assert p.attention_mask.tolist() == [[True] * 6, [True] * 4 + [False] * 2]
    assert p.starts.tolist() == [[0, 2, 5], [0, 1, 4]] and p.lengths.tolist() == [[2, 3, 1], [1, 3, 0]]
    torch.testing.assert_close(p.embeds[0, 2:5], speech)
    torch.testing.assert_close(p.embeds[1, 1:4], seal.decoder.wte.weight[[9, 10, 11]])
    assert (p.embeds[1, 4:] == 0).all() and p.position_ids[1].tolist() == list(range(6))
    # positions predicting segment 1: the position before each of its tokens
    assert p.predicting(1).tolist() == [1, 2, 3, 6 + 0, 6 + 1, 6 + 2]
    assert p.positions(2).tolist() == [5]
    # several segments at once: row by row, and within a row in the order asked (how Seal gathers every line's target)
    assert p.predicting([1, 2]).tolist() == [1, 2, 3, 4, 6 + 0, 6 + 1, 6 + 2]
    assert p.positions([2, 0]).tolist() == [5, 0, 1, 6 + 0]
    # a text segment may also be a 1-D tensor of ids
    same = seal.prompt([[torch.tensor([5, 6]), speech, [7]], [[8], torch.tensor([9, 10, 11])]])
    assert torch.equal(same.embeds, p.embeds) and torch.equal(same.lengths, p.lengths)
    with pytest.raises(ValueError, match="starts a row"):
        p.predicting(0)
    # a row gives the same hidden states alone as in the padded batch
    h = seal.hidden(p)
    for b, row in enumerate(rows):
        alone = seal.hidden(seal.prompt([row]))
        n = alone.shape[1]
        torch.testing.assert_close(h[b, :n], alone[0], rtol=1e-5, atol=1e-5)


def test_student_with_text_embeddings_equals_teacher():
    seal = tiny_seal()
    texts = [CharTokenizer().encode(t) for t in ["turn on the lights", "stop"]]
    # if the "speech" soft tokens are exactly the transcript's token embeddings, student == teacher
    speech = [seal.decoder.wte.weight[t] for t in texts]
    h_s, h_t = seal.student_hidden(speech, texts), seal.teacher_hidden(texts)
    assert h_s.shape == (sum(map(len, texts)), 64)
    torch.testing.assert_close(h_s, h_t)
    # and the teacher's positions predict o: their logits match a plain forward on the token ids
    ids = texts[0] + seal.sep_ids + texts[0]
    logits = seal.decoder(torch.tensor([ids]))[0]  # (T, V)
    start = len(texts[0]) + len(seal.sep_ids)
    torch.testing.assert_close(h_t[: len(texts[0])] @ seal.decoder.wte.weight.T, logits[start - 1 : -1],
                               rtol=1e-5, atol=1e-5)


def test_episode_loss_is_zero_for_text_embeddings_and_checks_the_label_positions():
    seal = tiny_seal()
    tok = CharTokenizer()
    texts = [tok.encode(t) for t in ["lights on", "stop", "lights on"]]
    labels = [tok.encode(" ab\n"), tok.encode(" cde\n"), tok.encode(" ab\n")]
    sep = tok.encode(" =>")
    emb = seal.decoder.wte.weight
    rows = [[(emb[t], t, y) for t, y in zip(texts, labels)], [(emb[texts[1]], texts[1], labels[1])]]
    loss, n = seal.episode_loss(rows, sep)
    assert n == sum(map(len, labels)) + len(labels[1])  # every label's tokens, in rows of 3 and 1 lines
    assert float(loss) == pytest.approx(0.0, abs=1e-6)  # soft tokens = token embeddings: student == teacher
    # perturbed soft tokens: a positive KL whose gradient reaches them, and the same number as the plain
    # kl_loss on full logits at the positions predicting the labels of the one-row batch
    x = (emb[texts[1]] + 3.0 * torch.randn(len(texts[1]), 64)).requires_grad_()
    loss, n = seal.episode_loss([[(x, texts[1], labels[1])]], sep)
    loss.backward()
    assert float(loss.detach()) > 0 and x.grad.abs().sum() > 0
    with torch.no_grad():
        student = seal.decoder(inputs_embeds=torch.cat([x, emb[sep + labels[1]]])[None])[0]  # (T, V)
        teacher = seal.decoder(torch.tensor([texts[1] + sep + labels[1]]))[0]
    at = lambda logits, start: logits[start - 1 : start - 1 + n]  # positions predicting the label
    expect = kl_loss(at(student, len(texts[1]) + len(sep)), at(teacher, len(texts[1]) + len(sep)),
                     temperature=seal.config.temperature)
    assert float(loss.detach()) == pytest.approx(float(expect), rel=1e-3)


def test_several_lines_per_row_layout_and_example_order():
    one, two = tiny_seal(), tiny_seal(lines=2)
    two.load_state_dict(one.state_dict())
    texts = [CharTokenizer().encode(t) for t in ["turn on", "stop", "lamp"]]  # rows: [0, 1], [2]
    h1, h2 = one.teacher_hidden(texts), two.teacher_hidden(texts)
    assert h2.shape == h1.shape == (sum(map(len, texts)), 64)
    # first lines of rows see no other line: the same states as one example per row
    n0, n1 = len(texts[0]), len(texts[1])
    torch.testing.assert_close(h2[:n0], h1[:n0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h2[n0 + n1:], h1[n0 + n1:], rtol=1e-5, atol=1e-5)
    # the second line of row 0 is predicted after the whole first line and a newline
    assert two.newline_ids == CharTokenizer().encode("\n")
    ids = texts[0] + two.sep_ids + texts[0] + two.newline_ids + texts[1] + two.sep_ids + texts[1]
    logits = two.decoder(torch.tensor([ids]))[0]  # (T, V)
    torch.testing.assert_close(h2[n0 : n0 + n1] @ two.decoder.wte.weight.T, logits[len(ids) - n1 - 1 : -1],
                               rtol=1e-5, atol=1e-5)
    # and speech that is exactly the transcripts' embeddings still gives the teacher's states
    speech = [two.decoder.wte.weight[t] for t in texts]
    torch.testing.assert_close(two.student_hidden(speech, texts), h2)
    with pytest.raises(ValueError, match="lines"):
        SealConfig(lines=0)


def test_kl_loss_matches_plain_kl_on_full_logits():
    seal = tiny_seal()
    wav, lengths = torch.randn(2, 8000), torch.tensor([8000, 6000])
    texts = [CharTokenizer().encode(t) for t in ["lights on", "music"]]
    feats, fl = seal.encode(wav, lengths)
    loss, n = seal.loss(feats, fl, texts)
    assert n == sum(map(len, texts))
    W = seal.decoder.wte.weight
    ref = kl_loss(seal.student_hidden(seal.speech_embeds(feats, fl), texts) @ W.T, seal.teacher_hidden(texts) @ W.T)
    torch.testing.assert_close(loss, ref)


def test_psrt_ce_loss_matches_cross_entropy():
    seal = tiny_seal(loss="ce")
    wav = torch.randn(1, 8000)
    text = CharTokenizer().encode("bring shoes")
    feats, fl = seal.encode(wav)
    loss, n = seal.loss(feats, fl, [text])
    speech = seal.speech_embeds(feats, fl)[0]
    embeds = torch.cat([speech, seal.decoder.wte.weight[seal.sep_ids + text]])[None]
    logits = seal.decoder(inputs_embeds=embeds)[0]  # (T, V)
    ref = F.cross_entropy(logits[-len(text) - 1 : -1], torch.tensor(text))
    torch.testing.assert_close(loss, ref)
    assert n == len(text)


def test_only_projector_trains_and_frozen_parts_stay_in_eval():
    seal = tiny_seal(encoder_layer=1)
    seal.train()
    assert seal.projector.training and not seal.encoder.training and not seal.decoder.training
    trainable = {n for n, p in seal.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("projector.") for n in trainable)
    feats, fl = seal.encode(torch.randn(1, 4000))
    _, _, layers = seal.encoder(torch.randn(1, 4000), output_hidden_states=True)
    assert feats.shape == layers[1].shape  # encoder_layer=1 selects that layer's output


def test_projector_checkpoint_roundtrip_and_mismatch(tmp_path):
    seal = tiny_seal()
    path = tmp_path / "projector.safetensors"
    seal.save_projector(path)
    other = tiny_seal()
    other.load_projector(path)
    for k, v in seal.projector.state_dict().items():
        assert torch.equal(v, other.projector.state_dict()[k])
    wrong_lm = tiny_seal()
    wrong_lm.config.lm = "gpt2"
    with pytest.raises(ValueError, match=r"lm='tiny-lm'.*lm='gpt2'"):
        wrong_lm.load_projector(path)
    wrong_layer = tiny_seal(encoder_layer=1)
    with pytest.raises(ValueError, match="encoder_layer"):
        wrong_layer.load_projector(path)
    junk = tmp_path / "junk.safetensors"
    from decoder import save_safetensors
    save_safetensors({"x": torch.zeros(2)}, str(junk))
    with pytest.raises(ValueError, match="not a Seal projector checkpoint"):
        seal.load_projector(junk)
