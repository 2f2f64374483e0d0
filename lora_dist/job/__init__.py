"""The training job's support: flags, data, DeepSpeed config filling, checkpoints, evaluation,
process-group setup and the demo assets. `launch/train.py` drives them; the adapter library
(`lora_dist` proper) imports nothing from here."""
