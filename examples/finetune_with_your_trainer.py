"""Fine-tune OLoRA+ with your own transformers Trainer: oloraplus gives the OLoRA init and the LoRA+ optimizer.

    python examples/finetune_with_your_trainer.py --model smollm2-135m --data alpaca_sample.json --lr_ratio 4

--model: smollm2-135m (the embedded SmolLM2-135M-Instruct), tinyllama, a hub id or a local folder.
--data: Alpaca-format records [{"instruction", "input", "output"}, ...] in a JSON file.
Everything else is plain PEFT + transformers: put your own data pipeline, collator and callbacks here.
"""

import argparse
import json
import os

from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

import oloraplus
from oloraplus.models import load_base  # resolves the aliases; AutoModelForCausalLM works as well

PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def tokenize(tok, record, max_length=256):
    """Prompt + answer + EOS; the loss only on the answer (labels -100 on the prompt)."""
    prompt = tok(PROMPT.format(**record))["input_ids"]
    answer = tok(record["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = (prompt + answer)[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ([-100] * len(prompt) + answer)[:max_length]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=os.environ.get("OLORAPLUS_DATA", "../shared/data/alpaca/alpaca_sample.json"))
    p.add_argument("--output_dir", default="runs/your-trainer")
    p.add_argument("--lr_ratio", type=float, default=4.0, help="LoRA+ lambda: lora_B learns at lambda x lr")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--n_train", type=int, default=200)
    p.add_argument("--max_steps", type=int, default=25)
    p.add_argument(
        "--report_to", default="none", help="tensorboard, mlflow, wandb, trackio, ... (as TrainingArguments)"
    )
    a = p.parse_args(argv)

    model, tok = load_base(a.model)
    with open(a.data, encoding="utf-8") as f:
        train = [tokenize(tok, r) for r in json.load(f)[: a.n_train]]
    # PEFT's default init first; olora_init then sets B = Q_r, A = R_r and W <- W - (alpha/r)·B·A
    peft_model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    initial = oloraplus.olora_init(peft_model)  # (A0, B0): what save_adapter needs for the original base

    args = TrainingArguments(
        output_dir=a.output_dir,
        learning_rate=a.lr,
        max_steps=a.max_steps,
        per_device_train_batch_size=8,
        warmup_steps=0.1,
        logging_steps=5,
        save_strategy="no",
        report_to=a.report_to,
    )
    optimizer = oloraplus.loraplus_optimizer(
        peft_model, args, lr_ratio=a.lr_ratio
    )  # what `args` asks for, B at lambda x lr
    trainer = Trainer(
        model=peft_model,
        args=args,
        train_dataset=train,
        optimizers=(optimizer, None),  # Trainer adds the schedule
        data_collator=DataCollatorForSeq2Seq(tok, padding=True),
    )
    trainer.train()
    oloraplus.save_adapter(peft_model, os.path.join(a.output_dir, "adapter"), initial)  # for the ORIGINAL base model
    return trainer


if __name__ == "__main__":
    main()
