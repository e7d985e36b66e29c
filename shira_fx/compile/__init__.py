"""The torch.compile side of shira_fx, one file per stage: `rewrite` (the fx pass over Dynamo
graphs, before AOTAutograd), `recompute` (joint-graph tags for the min-cut partitioner),
`report` (what a graph's compile did, read back from its partition) and `backend` (the
backend that runs them around an inner compiler)."""
