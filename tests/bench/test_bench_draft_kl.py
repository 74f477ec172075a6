"""`fastmedusa bench draft-kl`'s KL targets: "renorm" is the library's draft-vocabulary KL (its fused op, an
independent implementation), "extra" is a distribution over the draft tokens plus one outside class."""

import torch

from fastmedusa.bench import draft_kl
from fastmedusa.model import MedusaConfig, MedusaModel


def _setup():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    ).double()  # fmt: skip
    token_map = torch.randperm(200, generator=torch.Generator().manual_seed(1))[:40]
    model = MedusaModel.from_base(base, MedusaConfig(num_heads=2, draft_vocab_size=40), token_map)
    model.set_stage(1)
    with torch.no_grad():
        for p in model.medusa_heads.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(0, 200, (3, 12), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    batch["hidden"] = model.backbone_hidden_states(ids)
    draft_kl.add_teacher([batch], base.get_output_embeddings().weight, model.medusa_heads.token_map)
    return model, batch


def test_renorm_target_is_the_library_draft_kl():
    model, batch = _setup()
    heads = model.medusa_heads
    bench = torch.stack([t[0] for t in draft_kl.head_terms(heads, None, batch, "renorm")])
    library = heads.kl_divergence(batch["hidden"], batch["labels"], impl="chunked")
    torch.testing.assert_close(bench, library, rtol=1e-9, atol=1e-12)


def test_extra_class_target_sums_to_one_and_is_a_kl():
    model, batch = _setup()
    extra = torch.nn.ModuleList(torch.nn.Linear(32, 1).double() for _ in range(2))
    losses = [t[0] for t in draft_kl.head_terms(model.medusa_heads, extra, batch, "extra")]
    assert all(float(loss.detach()) >= 0 for loss in losses)
    inside = (batch["t_draft"] - batch["t_lse"][..., None]).exp().sum(-1)  # teacher mass on the draft tokens
    assert ((inside > 0) & (inside < 1)).all()  # so the outside class has positive mass too
