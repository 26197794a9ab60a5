"""The file job behind `angle-rt embed`: texts from Parquet / JSONL / CSV / TXT into vectors
(Parquet or .npy), streamed in chunks, resumable after a crash.

Parquet needs pyarrow (`pip install 'angle-rt[embed]'`); nothing here is imported by
`import angle_rt`.
"""

from angle_rt.embed.errors import InputError, OutputExistsError
from angle_rt.embed.job import EmbedResult, embed_file
from angle_rt.embed.readers import open_input

__all__ = ["EmbedResult", "InputError", "OutputExistsError", "embed_file", "open_input"]
