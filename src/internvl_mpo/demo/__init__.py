"""The demo: synthetic shapes VQA data (`synth`), its tokenizer (`tokenizer`) and the tiny model config (`config`)."""
