"""The GPT as megatron-core builds it: presets, the L1 objective, tied embeddings, one step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conf.cli import compose
from pretrain.model import build_gpt, flops_per_token, padded_vocab_size, position_ids, transformer_config


@pytest.fixture(scope="module")
def single_process():  # noqa: ANN201
    from parallel.topology import Topology

    cfg = compose(["model=tiny", "data.dir=unused"])
    topo = Topology.from_config(cfg, world_size=1, rank=0)
    topo.init(seed=1)
    yield cfg
    Topology.destroy()


@pytest.mark.parametrize(
    ("name", "millions"),
    [("tiny", 0.81), ("gpt1", 116.5), ("gpt2-small", 124.4), ("gpt2-medium", 354.8), ("gpt-1b", 1315)],
)
def test_presets_have_the_published_sizes(name: str, millions: float) -> None:
    """Parameter counts from the shapes, with GPT-2's vocabulary (tiny: nanoGPT's 65 chars)."""
    m = compose([f"model={name}"]).model
    vocab = 67 if name == "tiny" else (40478 if name == "gpt1" else 50257)
    d, layers, ffn = m.hidden_size, m.num_layers, m.ffn_hidden_size
    n = layers * (4 * d * d + 4 * d + 2 * d * ffn + ffn + d + 4 * d) + padded_vocab_size(vocab, m) * d
    n += m.seq_len * d + 2 * d
    assert n / 1e6 == pytest.approx(millions, rel=0.01)
    assert flops_per_token(m, vocab, m.seq_len) > 6 * (n - m.seq_len * d - padded_vocab_size(vocab, m) * d)


def test_loss_is_next_token_cross_entropy_with_tied_embeddings(single_process) -> None:  # noqa: ANN001
    cfg = single_process
    model = build_gpt(cfg.model, 67, transformer_config(cfg.model))
    assert sum(p.numel() for p in model.parameters()) == 810752  # the preset test's formula
    assert model.shared_embedding_or_output_weight() is model.embedding.word_embeddings.weight
    tokens = torch.randint(0, 67, (3, 17))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    per_token = model(inputs, position_ids(3, 16), None, labels=labels)
    logits = model(inputs, position_ids(3, 16), None)
    assert logits.shape == (3, 16, padded_vocab_size(67, cfg.model))
    reference = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(per_token.reshape(-1), reference, rtol=1e-5, atol=1e-5)
    # causal: changing the last token leaves earlier logits alone
    changed = inputs.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 67
    again = model(changed, position_ids(3, 16), None)
    torch.testing.assert_close(again[:, :-1], logits[:, :-1])
    assert not torch.allclose(again[:, -1], logits[:, -1])


def test_sdpa_core_attention_matches_megatrons(single_process) -> None:  # noqa: ANN001
    """Same weights (attention has none of its own), same loss, logits and gradients as megatron's
    kernel -- which runs megatron's [s, b, h] layout, while the SDPA model runs batch-first."""
    cfg = single_process
    tokens = torch.randint(0, 67, (2, 33))
    results = []
    for attention in ("megatron", "sdpa"):
        cfg.model.attention = attention
        model = build_gpt(cfg.model, 67, transformer_config(cfg.model), seed=3)
        layout = []
        model.decoder.register_forward_hook(lambda _m, _i, out, seen=layout: seen.append(tuple(out.shape)))
        loss = model(tokens[:, :-1], position_ids(2, 32), None, labels=tokens[:, 1:]).mean()
        loss.backward()
        logits = model(tokens[:, :-1], position_ids(2, 32), None).detach()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        kind = type(model.decoder.layers[0].self_attention.core_attention).__name__
        results.append((loss.detach(), logits, grads, kind, model.batch_first, layout[0]))
    (loss_a, logits_a, grads_a, *meta_a), (loss_b, logits_b, grads_b, *meta_b) = results
    assert meta_a == ["DotProductAttention", False, (32, 2, 128)]
    assert meta_b == ["SDPAttention", True, (2, 32, 128)]
    assert logits_a.shape == logits_b.shape == (2, 32, padded_vocab_size(67, cfg.model))
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits_b, logits_a, rtol=1e-5, atol=1e-5)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-6)


def test_modern_shape_is_megatrons_and_batch_first_rope_matches(single_process) -> None:  # noqa: ANN001
    """llama-tiny: RMSNorm, SwiGLU, GQA, rotary positions, no biases, untied output -- built by
    megatron-core; the batch-first SDPA path (rotary frequencies laid out [1, s, 1, d]) gives the
    loss, logits and gradients of megatron's own [s, b, h] attention."""
    m = compose(["model=llama-tiny", "data.dir=unused"]).model
    d, ffn, kv = m.hidden_size, m.ffn_hidden_size, m.hidden_size // m.num_heads * m.num_query_groups
    tokens = torch.randint(0, 67, (2, 33))
    results = []
    for attention in ("megatron", "sdpa"):
        m.attention = attention
        model = build_gpt(m, 67, transformer_config(m), seed=3)
        layer = model.decoder.layers[0]
        assert type(layer.input_layernorm).__name__ == "RMSNorm"
        assert layer.self_attention.linear_qkv.weight.shape == (d + 2 * kv, d)
        assert layer.mlp.linear_fc1.weight.shape == (2 * ffn, d)  # [gate; up]
        assert not any(n.endswith(".bias") for n, _ in model.named_parameters())
        assert model.output_layer.weight is not model.embedding.word_embeddings.weight
        assert not hasattr(model.embedding, "position_embeddings")
        loss = model(tokens[:, :-1], position_ids(2, 32), None, labels=tokens[:, 1:]).mean()
        loss.backward()
        logits = model(tokens[:, :-1], position_ids(2, 32), None).detach()
        results.append((loss.detach(), logits, {n: p.grad.clone() for n, p in model.named_parameters()}))
        assert model.batch_first == (attention == "sdpa")
    (loss_a, logits_a, grads_a), (loss_b, logits_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits_b, logits_a, rtol=1e-5, atol=1e-5)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-6)
    # rotary positions: attention without positions is blind to the order of the context; swapping
    # two context tokens changes the last position's logits only because of the rotation
    context = torch.tensor([[5, 9, 2, 7, 3, 11, 4, 8]])
    swapped = context[:, [1, 0, 2, 3, 4, 5, 6, 7]]
    last = [model(t, position_ids(1, 8), None)[0, -1] for t in (context, swapped)]
    assert (last[0] - last[1]).abs().max() > 1e-4


@pytest.mark.parametrize("preset", ["llama-tiny", "moe-tiny"])
def test_cpu_fast_paths_equal_megatrons_own(single_process, monkeypatch, preset: str) -> None:  # noqa: ANN001
    """The tp = 1 SwiGLU as two linears over fc1's halves (a MoE expert's as one, with its routing
    weights), RoPE with cos/sin once per forward and SDPA's own GQA give exactly megatron's MLP
    forward and rotary embedding (loss and gradients)."""
    from megatron.core.transformer import attention as megatron_attention
    from megatron.core.transformer.mlp import MLP

    from pretrain.model import layers

    m = compose([f"model={preset}", "data.dir=unused"]).model
    tokens = torch.randint(0, 67, (2, 33))
    calls = {"mlp": 0, "rope": 0}

    def counted(name: str, fn):  # noqa: ANN001, ANN202
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    results = []
    for fast in (False, True):
        model = build_gpt(m, 67, transformer_config(m), seed=3)
        mlp, rope = (layers.LocalMLP.forward, layers.apply_rotary_pos_emb) if fast else (MLP.forward, None)
        monkeypatch.setattr(layers.LocalMLP, "forward", counted("mlp", mlp) if fast else mlp)
        rope = counted("rope", rope) if fast else layers._megatron_apply_rotary
        monkeypatch.setattr(megatron_attention, "apply_rotary_pos_emb", rope)
        loss = model(tokens[:, :-1], position_ids(2, 32), None, labels=tokens[:, 1:]).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    mlps = m.num_layers * (m.num_experts or 1)
    assert calls == {"mlp": mlps, "rope": 2 * m.num_layers}  # the fast paths did run
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-7)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_recompute_gives_the_same_loss_and_gradients(single_process, preset: str) -> None:  # noqa: ANN001
    """model.recompute=selective|full (megatron-core's recompute_granularity) changes memory, not maths;
    the activations saved for backward shrink (counted with saved_tensors_hooks)."""
    tokens = torch.randint(0, 67, (2, 33))
    results = {}
    for mode in ("none", "selective", "full"):
        m = compose([f"model={preset}", "data.dir=unused", f"model.recompute={mode}", "model.dropout=0.1"]).model
        model = build_gpt(m, 67, transformer_config(m), seed=3)
        model.train()
        saved = []

        def pack(t: torch.Tensor, seen: list = saved) -> torch.Tensor:
            seen.append(t.numel() * t.element_size())
            return t

        from megatron.core import tensor_parallel

        torch.manual_seed(5)  # the same dropout masks in each mode (recomputation replays the RNG states)
        tensor_parallel.model_parallel_cuda_manual_seed(5)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(tokens[:, :-1], position_ids(2, 32), None, labels=tokens[:, 1:]).mean()
        loss.backward()
        results[mode] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved))
    loss_none, grads_none, bytes_none = results["none"]
    for mode in ("selective", "full"):
        loss, grads, _ = results[mode]
        torch.testing.assert_close(loss, loss_none, rtol=0, atol=1e-6)
        for name, grad in grads_none.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7)
    assert results["full"][2] < results["selective"][2] <= bytes_none


def test_finetune_batches_cut_to_their_longest_example_give_the_same_loss(single_process) -> None:  # noqa: ANN001
    """``TaskBatches`` cuts each step's tokens to its longest example (rounded up to 8): only padding
    goes, so L3 and the head's scores are those of the full-width batch."""
    import numpy as np

    from pretrain.tasks.finetune_examples import TaskBatches
    from pretrain.tasks.finetune_head import FinetuneGPT, make_forward_step

    cfg = single_process
    lengths = np.array([5, 9, 3, 12, 7, 4, 11, 6])
    arrays = {
        "tokens": np.zeros((8, 1, 40), dtype=np.int64),
        "extract": (lengths - 1)[:, None],
        "labels": np.arange(8) % 2,
        "choice_mask": np.ones((8, 1), dtype=np.float32),
    }
    rng = np.random.default_rng(0)
    for i, n in enumerate(lengths):
        arrays["tokens"][i, 0, :n] = rng.integers(1, 60, n)
    batches = TaskBatches(arrays, global_batch=4, micro=4, rank=0, dp=1, seed=3)
    (first,) = batches.next_step()
    (second,) = batches.next_step()
    widths = [b["tokens"].shape[-1] for b in (first, second)]
    longest = [int(b["extract"].max()) + 1 for b in (first, second)]
    assert widths == [-(-n // 8) * 8 for n in longest] and min(widths) < 40
    model = FinetuneGPT(build_gpt(cfg.model, 67, transformer_config(cfg.model)), "classification", 2, 0.0, 1).eval()
    step = make_forward_step(0.5, 64)
    for batch in (first, second):
        full = dict(batch, tokens=torch.zeros(4, 1, 40, dtype=torch.long))
        full["tokens"][..., : batch["tokens"].shape[-1]] = batch["tokens"]
        with torch.no_grad():
            (out, scores), loss_func = step(iter([batch]), model)
            (out_full, scores_full), loss_func_full = step(iter([full]), model)
        torch.testing.assert_close(scores, scores_full, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss_func((out, scores))[0], loss_func_full((out_full, scores_full))[0])
