"""`oncoserve data ingest | synth | manifest`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from imaging.errors import StudyError
from pipelines.cli._console import console, user_errors

# Imaging code (nibabel, scipy) is imported inside each command: every other command starts faster.

app = typer.Typer(help="Datasets: ingest DICOM/NIfTI, synthesise phantoms, write manifests.", no_args_is_help=True)


@app.command()
def ingest(
    src: Path = typer.Argument(..., help="A DICOM directory or zip, a NIfTI file, or a folder of *_<modality>.nii.gz"),
    out: Path = typer.Option(..., "--out", help="Dataset directory (BraTS layout) to add the case to."),
    case_id: str = typer.Option(None, "--case-id", help="Case id; default: a pseudonym from a salted hash."),
    site: str = typer.Option(None, "--site", help="Acquisition site label for clinical.csv."),
    mapping: str = typer.Option(None, "--mapping", help='JSON: series UID or description -> modality, e.g. \'{"AX T1 POST": "t1ce"}\''),
) -> None:
    """Turn DICOM or NIfTI input into a de-identified case and print what was removed."""
    from imaging.ingest import ingest as ingest_case

    with user_errors(StudyError, ValueError, FileNotFoundError):
        series_map = json.loads(mapping) if mapping else None
        result = ingest_case(src, out, case_id=case_id, site=site, mapping=series_map)
    console.print(f"[green]ingested[/] {result.case_id} ({result.source_kind}) -> {result.folder}")
    console.print(f"modalities: {', '.join(result.modalities)}; missing: {', '.join(result.missing) or 'none'}")
    if result.series_mapping:
        for modality, decision in result.series_mapping.items():
            console.print(f"  {modality:6s} <- {decision['series']!r} (confidence {decision['confidence']:.2f}: {decision['reason']})")
    console.print_json(data=result.removed)


@app.command()
def synth(
    out: Path = typer.Option(..., "--out", help="Directory to create (must not exist or be empty)."),
    n: int = typer.Option(..., "--n", min=1, help="Number of cases."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives identical bytes."),
    sites: int = typer.Option(1, "--sites", min=1, help="Number of acquisition sites (site effects)."),
    resolution: float = typer.Option(2.0, "--resolution", min=1.0, max=4.0, help="Voxel size in mm."),
    ood_fraction: float = typer.Option(0.0, "--ood-fraction", min=0.0, max=0.9, help="Fraction of out-of-distribution cases."),
    raw: bool = typer.Option(False, "--raw", help="Raw scanner studies: skull, scalp, neck, head pose, per-series motion, "
                             "bias field, Rician noise, thick slices; the true brain mask and transforms are written too."),
    first_site: int = typer.Option(0, "--first-site", min=0, help="Scanner parameters start at this site (0 = the reference "
                                   "scanner); a dataset from sites no other dataset has starts past theirs."),
    generator: int = typer.Option(2, "--generator-version", min=1, max=2, help="Phantom generator: 2 (marker signals of "
                                  "their own, site effects a z-score keeps) or 1 (the round-1 generator, reproduced exactly)."),
    workers: int = typer.Option(0, "--workers", min=0, help="Processes building cases (0 = one per CPU core); "
                                "the bytes written do not depend on it."),
) -> None:
    """Write a synthetic glioma dataset on the MNI152 brain in the BraTS layout."""
    from imaging.phantoms import synthesise
    from imaging.raw_phantoms import synthesise_raw

    if raw and (sites != 1 or ood_fraction):
        console.print("[red]error:[/] --raw makes single-site, in-distribution cases (drop --sites/--ood-fraction)")
        raise typer.Exit(2)
    columns = (TextColumn("synthesising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    workers = workers or os.cpu_count() or 1
    with user_errors(FileExistsError, ValueError), Progress(*columns, console=console) as progress:
        task = progress.add_task("cases", total=n)
        report = lambda done, total: progress.update(task, completed=done)  # noqa: E731
        if raw:
            synthesise_raw(out, n, seed, resolution, progress=report, workers=workers)
        else:
            synthesise(out, n, seed, sites, resolution, ood_fraction, progress=report, first_site=first_site,
                       version=generator, workers=workers)  # fmt: skip
    extra = ", <case>_brainmask.nii.gz" if raw else ""
    console.print(f"wrote {n} {'raw ' if raw else ''}cases to {out} (clinical.csv, phantoms.json{extra})")


@app.command()
def manifest(root: Path = typer.Argument(..., help="Dataset directory.")) -> None:
    """Write ROOT/manifest.json (sha256 of every file) and print the dataset hash."""
    from imaging import manifest as manifest_mod

    with user_errors(FileNotFoundError):
        result = manifest_mod.write(root)
    console.print(f"{result['n_cases']} cases, {result['n_files']} files")
    typer.echo(result["dataset_hash"])
