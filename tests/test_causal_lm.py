import torch

from lightning_modules.causal_lm import CausalLMModule
from testtime.lm import next_token_loss


def _module(path):
    module = CausalLMModule(model_name_or_path=path, learning_rate=1e-2)
    module.configure_model()
    return module


def test_next_token_loss_matches_cross_entropy_and_survives_empty_masks():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.tensor([[-100, 1, 2, -100], [-100, -100, 3, 4]])
    expected = torch.stack([
        -torch.log_softmax(logits[0, 0], -1)[1], -torch.log_softmax(logits[0, 1], -1)[2],
        -torch.log_softmax(logits[1, 1], -1)[3], -torch.log_softmax(logits[1, 2], -1)[4],
    ]).mean()
    assert torch.allclose(next_token_loss(logits, labels), expected)

    empty = next_token_loss(logits, torch.full_like(labels, -100))
    empty.backward()
    assert empty.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_packed_records_do_not_attend_to_each_other(tiny_model_dir, tokenizer):
    module = _module(tiny_model_dir).eval()
    a, b = tokenizer("12+3=15")["input_ids"], tokenizer("7*8=56")["input_ids"]
    packed = {
        "input_ids": torch.tensor([a + b]),
        "attention_mask": torch.ones(1, len(a) + len(b), dtype=torch.long),
        "labels": torch.tensor([a + [-100] + b[1:]]),
        "position_ids": torch.tensor([list(range(len(a))) + list(range(len(b)))]),
    }
    separate = [
        {"input_ids": torch.tensor([s]), "attention_mask": torch.ones(1, len(s), dtype=torch.long),
         "labels": torch.tensor([s])} for s in (a, b)
    ]
    n_a, n_b = len(a) - 1, len(b) - 1  # predicted tokens per record
    expected = (module(separate[0]) * n_a + module(separate[1]) * n_b) / (n_a + n_b)
    assert torch.allclose(module(packed), expected, atol=1e-5)


def test_training_lowers_the_loss(tiny_model_dir, tokenizer):
    module = _module(tiny_model_dir)
    ids = torch.tensor([tokenizer("3+4=7")["input_ids"]] * 4)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    optimizer = module.configure_optimizers()["optimizer"]
    first = module(batch)
    for _ in range(20):
        optimizer.zero_grad()
        module(batch).backward()
        optimizer.step()
    assert module(batch).item() < 0.5 * first.item()
