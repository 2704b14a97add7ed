"""What transformers reads from a GGUF file, for tests/transformers.rs to hold eabfit's reading of
the same file against: the config (transformers' GGUF integration), the token ids of each text
under transformers' tokenizer converted from the GGUF, and, straight from the metadata through
the gguf package, the BOS/EOS ids and the ids of the named tokens.

    python gguf_reference.py FILE.gguf OUT.json TEXT_FILE... [--token TEXT]...
"""
import argparse
import json
import os

from gguf import GGUFReader
from transformers import AutoConfig, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("gguf")
ap.add_argument("out")
ap.add_argument("texts", nargs="+")
ap.add_argument("--token", action="append", default=[])
a = ap.parse_args()

folder, name = os.path.split(os.path.abspath(a.gguf))
cfg = AutoConfig.from_pretrained(folder, gguf_file=name).to_dict()
rope = cfg.get("rope_parameters") or {}
config = {
    "model_type": cfg["model_type"],
    "num_hidden_layers": cfg["num_hidden_layers"],
    "hidden_size": cfg["hidden_size"],
    "intermediate_size": cfg["intermediate_size"],
    "num_attention_heads": cfg["num_attention_heads"],
    "num_key_value_heads": cfg["num_key_value_heads"],
    "vocab_size": cfg["vocab_size"],
    "max_position_embeddings": cfg["max_position_embeddings"],
    "rope_theta": rope.get("rope_theta", cfg.get("rope_theta")),
    "rms_norm_eps": cfg["rms_norm_eps"],
    "tie_word_embeddings": cfg["tie_word_embeddings"],
}

tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
ids = []
for path in a.texts:
    with open(path, encoding="utf-8", newline="") as f:  # keep "\r\n" as it is
        ids.append(tok.encode(f.read(), add_special_tokens=False))

fields = GGUFReader(a.gguf).fields
tokens = fields["tokenizer.ggml.tokens"]
vocab = {bytes(tokens.parts[i]).decode("utf-8"): n for n, i in enumerate(tokens.data)}
meta = {
    "bos": int(fields["tokenizer.ggml.bos_token_id"].contents()),
    "eos": int(fields["tokenizer.ggml.eos_token_id"].contents()),
    "tokens": {t: vocab[t] for t in a.token},
    # transformers' own tokenizer's specials, printed for the record: its GGUF converter may
    # append BOS/EOS as new tokens instead of using the metadata's ids.
    "transformers_bos_eos": [tok.bos_token_id, tok.eos_token_id],
}
with open(a.out, "w") as f:
    json.dump({"config": config, "ids": ids, "meta": meta}, f)
print(json.dumps({"config": config, "meta": meta, "tokens": [len(i) for i in ids]}))
