"""`bei embed --engine`: a batch job on one machine (or a Ray cluster) that embeds a file or a folder of
files in process, no server, into Parquet part files under an output folder.

sources: the input files, planned into parts of a fixed number of rows, and one part's rows read back;
parts: the output folder (job record, part files written atomically, which parts are done);
embedder: an engine loaded once, texts -> the vectors the server would answer;
meter: rows/s and ETA on stderr; job: the local job; ray_job: the same parts as a Ray Data pipeline.
"""
