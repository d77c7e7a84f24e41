"""How often an early exit agrees with the full model, without LayerSkip-style training: top-1 of the final
norm + LM head applied at layer E, against the last layer's top-1, over one English passage (float32).

    python scripts/early_exit_agreement.py
"""

import torch

from workbench.models import load_model

TEXT = ("The city council met on Tuesday to discuss the new library. Members agreed that the old building was too "
        "small for the growing town, and that a new site near the river would give more room for books, study "
        "rooms and a children's corner. The mayor said the project would be paid for by a mix of state grants "
        "and local donations, and that work could begin next spring if the plans are approved in time.")


def main() -> None:
    loaded = load_model("smollm2-135m", dtype="float32")
    ids = torch.tensor(loaded.tokenizer(TEXT)["input_ids"])
    with torch.inference_mode():
        out = loaded.model(ids, torch.arange(len(ids)), None, hidden_states=True)
        final = out.logits.argmax(-1)
        for exit_layer in (4, 8, 12, 16, 20, 24, 27, 29):
            agree = (loaded.model.logits(out.hidden_states[exit_layer]).argmax(-1) == final).float().mean()
            print(f"exit after {exit_layer:>2} of {loaded.config.num_layers} layers: top-1 agreement {agree:.2f}")


if __name__ == "__main__":
    main()
