"""The fine-tuning quality benchmark behind `launch/init_quality.py` (issue 14).

task.py     the generated causal-LM task: a small Llama pretrained on arithmetic, fine-tuned on a
            shifted operation (train / val / test, exact match);
encoder.py  the same comparison from real pretrained weights (MiniLM-L6, generated classification);
methods.py  every method of the comparison as an AdapterConfig plus its update rule;
run.py      ONE run through the library's path: inject, initialize_adapters, train, evaluate;
grid.py     the LR sweep on val, then seeds on test, two processes at once, cached line by line;
report.py   tables, the power analysis and the loss-curve plot.
"""
