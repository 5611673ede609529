"""Regenerate ``aws_catalog.json`` from AWS's public data; run by hand, never in tests.

Instance types come from ``DescribeInstanceTypes`` (vCPUs, memory, GPUs with
their memory) and prices from the AWS Price List Query API (``GetProducts`` of
the ``AmazonEC2`` service: Linux, shared tenancy, no pre-installed software,
on-demand). Both need AWS credentials from the standard chain, but no
resources are created. Only the types listed in the current catalog (or given
with ``--types``) are looked up, so the catalog stays small.

Usage::

    python -m dstackd.backends.aws_catalog_update \\
        --regions us-east-1 us-west-2 eu-west-1 [--types g5.xlarge ...]

The script writes the catalog next to this file unless ``--output`` names
another path, with today's date as ``prices_taken_at``.
"""

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

CATALOG_PATH = Path(__file__).with_name("aws_catalog.json")
# The Price List Query API has endpoints in a few regions only; this one
# serves the prices of every region.
PRICING_REGION = "us-east-1"
MIB_PER_GB = 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regions", nargs="+", required=True, metavar="REGION")
    parser.add_argument(
        "--types",
        nargs="+",
        metavar="TYPE",
        help="instance types to include [default: those of the current catalog]",
    )
    parser.add_argument("--output", type=Path, default=CATALOG_PATH)
    args = parser.parse_args(argv)

    import boto3

    types = args.types or _current_types()
    specs = _describe_types(boto3.client("ec2", region_name=args.regions[0]), types)
    pricing = boto3.client("pricing", region_name=PRICING_REGION)
    entries = []
    for instance_type in types:
        if instance_type not in specs:
            print(f"skipped {instance_type}: DescribeInstanceTypes does not know it")
            continue

        prices = {
            region: price
            for region in args.regions
            if (price := _on_demand_price(pricing, instance_type, region)) is not None
        }
        if not prices:
            print(f"skipped {instance_type}: no on-demand Linux price in the regions")
            continue

        entries.append({**specs[instance_type], "prices": prices})

    catalog = {
        "prices_taken_at": datetime.date.today().isoformat(),
        "source": "AWS DescribeInstanceTypes and the Price List Query API "
        "(Linux, shared tenancy, on-demand), by aws_catalog_update.py",
        "instance_types": entries,
    }
    args.output.write_text(json.dumps(catalog, indent=1) + "\n")
    print(f"wrote {len(entries)} instance types to {args.output}")

    return 0


def _current_types() -> list[str]:
    with open(CATALOG_PATH) as file:
        catalog = json.load(file)

    return [entry["instance_type"] for entry in catalog["instance_types"]]


def _describe_types(ec2: Any, types: list[str]) -> dict[str, dict[str, Any]]:
    """Return vCPUs, memory in GB and GPUs of each type that EC2 describes."""
    specs: dict[str, dict[str, Any]] = {}
    paginator = ec2.get_paginator("describe_instance_types")
    for page in paginator.paginate(InstanceTypes=types):
        for item in page["InstanceTypes"]:
            gpus = [
                {
                    "name": gpu["Name"],
                    "memory_gb": round(gpu["MemoryInfo"]["SizeInMiB"] / MIB_PER_GB),
                    "count": gpu["Count"],
                }
                for gpu in item.get("GpuInfo", {}).get("Gpus", [])
            ]
            specs[item["InstanceType"]] = {
                "instance_type": item["InstanceType"],
                "vcpus": item["VCpuInfo"]["DefaultVCpus"],
                "memory_gb": round(item["MemoryInfo"]["SizeInMiB"] / MIB_PER_GB, 1),
                "gpus": gpus,
            }

    return specs


def _on_demand_price(pricing: Any, instance_type: str, region: str) -> float | None:
    """Return the on-demand USD price per hour of a Linux instance, or None."""
    filters = {
        "instanceType": instance_type,
        "regionCode": region,
        "operatingSystem": "Linux",
        "tenancy": "Shared",
        "preInstalledSw": "NA",
        "capacitystatus": "Used",
        "licenseModel": "No License required",
    }
    response = pricing.get_products(
        ServiceCode="AmazonEC2",
        Filters=[
            {"Type": "TERM_MATCH", "Field": field, "Value": value}
            for field, value in filters.items()
        ],
        MaxResults=10,
    )
    for product_text in response["PriceList"]:
        product = json.loads(product_text)
        for term in product.get("terms", {}).get("OnDemand", {}).values():
            for dimension in term.get("priceDimensions", {}).values():
                usd = float(dimension.get("pricePerUnit", {}).get("USD", "0"))
                if dimension.get("unit") == "Hrs" and usd > 0:
                    return usd

    return None


if __name__ == "__main__":
    sys.exit(main())
