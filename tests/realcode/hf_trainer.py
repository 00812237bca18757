"""A Hugging Face Trainer fine-tuning a tiny config-built GPT-2 on random tokens (no downloads)."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, set_seed


class Tokens(torch.utils.data.Dataset):
    def __init__(self, size: int, length: int, vocab: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (size, length), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


set_seed(0)
config = GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=2)
model = GPT2LMHeadModel(config)
args = TrainingArguments(
    output_dir="out",
    max_steps=40,
    per_device_train_batch_size=8,
    logging_steps=10,
    save_steps=20,
    report_to=[],
    use_cpu=True,
    seed=0,
    disable_tqdm=True,
)
trainer = Trainer(model=model, args=args, train_dataset=Tokens(512, 64, 128))
result = trainer.train()
print("final train loss", result.training_loss)
trainer.save_model("out/final")
