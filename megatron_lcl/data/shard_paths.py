"""Which webdataset shard files a data path names (standard library only: the config's validation
uses it without importing torch).

    shard_paths("data/prepared")          # a folder: its *.tar, sorted
    shard_paths("laion/{0..9}*.tar")      # a glob (or one .tar file): the files it matches, sorted

Reading them: `data.shards`.
"""

import glob
import os
from typing import List


def shard_paths(path: str) -> List[str]:
    """The shards one data path names, sorted: a folder's `*.tar`, a `.tar` file, else the files a glob
    matches (empty when there are none)."""
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "*.tar")))
    if os.path.isfile(path):
        return [path]
    return sorted(glob.glob(path))
