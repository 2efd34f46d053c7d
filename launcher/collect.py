"""Collect a sweep's runs into mean ± std tables and a bar chart, and print the Markdown table.

    python launcher/collect.py runs/sweeps/demo                         # a sweep made by launcher/sweep.py
    python launcher/collect.py runs/sweeps/table1 reference=cass_table1 # with the published numbers and deltas
    python launcher/collect.py runs/synth                               # runs made by hand, grouped by config
    python launcher/collect.py runs/sweeps/semimemes protocol=linear_probe split=dev

Writes table.md, table.csv, table.tex and table.png into the directory. Cells are mean ± sample std
(ddof=1) over seeds with n per row; failed and missing runs are listed under the table.
Options: any of configs/collect.yaml; --cfg job prints the config.
"""

from memetrain.cli import collect

if __name__ == "__main__":
    collect()
