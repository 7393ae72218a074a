"""Insights: the national picture (issue #20 item 3).

A read model fed by every topic that says who registered, who was certified, what grants and
donations moved and which plans and support corporations came into force, rebuildable from the
earliest offsets (a new generation: fresh tables and a fresh consumer group). It keeps ids, codes,
dates and amounts only: nothing sealed is ever opened, and an erased resident's id is removed from
every row (the counts stay).
"""
