"""The parts of the WebDataset manifest source (:mod:`manifests.webdataset_source`), one step per module.

==================  =====================================================================================
:mod:`.digests`     128-bit key digests and the grouping of equal digests (duplicate keys)
:mod:`.shards`      shard names (paths, brace patterns, URLs) and step 1 for one tar shard
:mod:`.recaptions`  the recaption store: step 2 (a recaption file into key-digest buckets on disk) and
                    step 4 (the join of a bucket with the samples, and the merge of the join outputs)
:mod:`.pool`        the worker processes (or in-process tasks for one worker)
:mod:`.samples`     steps 1 and 3 over all shards: the per-sample digests kept in memory, duplicate keys
:mod:`.parts`       step 5: the manifest parts, one per shard, and their publication
==================  =====================================================================================
"""
