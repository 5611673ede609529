"""The AWS EC2 backend: offers from a shipped catalog, instances through aioboto3.

Offers come from ``aws_catalog.json`` (instance types with their vCPUs, memory,
GPUs and on-demand prices per region) and, for spot, from
``DescribeSpotPriceHistory``. Every instance carries three tags: the
``InstanceRequested`` id (also sent as ``ClientToken``), this daemon's id and
the pool. ``create`` first looks for an instance with its id's tag, so a retry
after a crash between ``RunInstances`` and the provisioned record adopts the
instance instead of launching a second one. ``terminate`` returns only once
EC2 reports the instance as terminated, and raises ``BackendError`` until then.

dstackd manages one SSH key pair (the private key stays in the data directory)
and one security group per daemon, created in each region on first use.
Credentials come from the standard AWS chain. aioboto3 is imported on the first
call, so a daemon without an ``[aws]`` table never loads it.
"""

import json
import math
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from importlib import resources as package_resources
from typing import Any

import anyio
import msgspec
import structlog

from dstackd.backends.base import BackendError, LiveInstance, Provisioned
from dstackd.config import AwsConfig
from events.matching import mismatch
from events.model import Gpu, Offer, Requirements, Resources
from events.projection import State

log = structlog.get_logger(__name__)

BACKEND_NAME = "aws"
TAG_INSTANCE_ID = "dstackd:instance-id"
TAG_DAEMON_ID = "dstackd:daemon-id"
TAG_POOL = "dstackd:pool"

# EC2 states of an instance that is gone or going; any other state is alive.
ENDED_STATES = frozenset({"shutting-down", "terminated"})
# Canonical's account, which publishes the Ubuntu images.
UBUNTU_OWNER = "099720109477"
UBUNTU_IMAGE_NAME = "ubuntu/images/hvm-ssd*/ubuntu-*-amd64-server-*"
SPOT_PRICE_TTL_SECONDS = 300.0
KEY_FILE = "id_ed25519"


class CatalogGpu(msgspec.Struct, frozen=True):
    name: str
    memory_gb: float
    count: int


class CatalogEntry(msgspec.Struct, frozen=True):
    """One instance type: vCPUs, memory in GB, GPUs and USD per hour by region."""

    instance_type: str
    vcpus: int
    memory_gb: float
    gpus: tuple[CatalogGpu, ...]
    prices: dict[str, float]


class Catalog(msgspec.Struct, frozen=True):
    """The instance types dstackd offers, with where the prices came from."""

    prices_taken_at: str
    source: str
    instance_types: tuple[CatalogEntry, ...]


class Ec2Instance(msgspec.Struct, frozen=True):
    """An EC2 instance as ``DescribeInstances`` lists it, with dstackd's tags.

    ``launched_at`` is in seconds since the Unix epoch.
    """

    ec2_instance_id: str
    region: str
    state: str
    instance_id: str
    daemon_id: str
    launched_at: float
    public_ip: str = ""
    private_ip: str = ""
    public_dns: str = ""

    @property
    def alive(self) -> bool:
        return self.state not in ENDED_STATES


def load_catalog(path: str | None = None) -> Catalog:
    """Read the catalog shipped with the package, or the one at ``path``."""
    if path is None:
        data = (
            package_resources.files("dstackd.backends")
            .joinpath("aws_catalog.json")
            .read_bytes()
        )
    else:
        with open(path, "rb") as file:
            data = file.read()

    return msgspec.json.decode(data, type=Catalog)


class AwsBackend:
    """EC2 instances of one AWS account in the configured regions.

    Args:
        config: the ``[aws]`` table.
        daemon_id: this daemon's id, tagged on everything it creates.
        key_dir: directory for the SSH key pair, created with mode 0700.
        labels: returns the pool and the name of an instance id, for tags.
        sleep: waits between polls; tests pass a faster one.
    """

    name = BACKEND_NAME

    def __init__(
        self,
        config: AwsConfig,
        *,
        daemon_id: str,
        key_dir: str,
        catalog: Catalog | None = None,
        labels: Callable[[str], dict[str, str]] = lambda instance_id: {},
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.config = config
        self.daemon_id = daemon_id
        self.key_dir = key_dir
        self.catalog = catalog or load_catalog()
        self.labels = labels
        self.sleep = sleep
        self._session: Any = None
        self._spot_prices: dict[str, tuple[float, dict[str, float]]] = {}
        self._prepared: dict[str, tuple[str, str]] = {}
        self._prepare_lock = anyio.Lock()

    @property
    def resource_name(self) -> str:
        """The name of the key pair and the security group dstackd manages."""
        return f"dstackd-{self.daemon_id}"

    @property
    def key_path(self) -> str:
        return os.path.join(self.key_dir, KEY_FILE)

    # Offers

    def catalog_entries(self) -> list[CatalogEntry]:
        allowed = self.config.instance_types
        return [
            entry
            for entry in self.catalog.instance_types
            if allowed is None or entry.instance_type in allowed
        ]

    async def list_offers(self, requirements: Requirements) -> list[Offer]:
        """Return the fitting offers in the configured regions, cheapest first.

        Spot offers appear only when the spot policy allows them, priced at the
        lowest current spot price of any availability zone of the region.
        """
        offers: list[Offer] = []
        disk_gb = self._disk_gb(requirements)
        for region in self.config.regions:
            spot_prices: dict[str, float] = {}
            if requirements.spot_policy != "on-demand":
                spot_prices = await self.spot_prices(region)

            for entry in self.catalog_entries():
                offers.extend(
                    _entry_offers(
                        entry, region, disk_gb, spot_prices.get(entry.instance_type)
                    )
                )

        fitting = [offer for offer in offers if mismatch(requirements, offer) is None]

        return sorted(fitting, key=_offer_order)

    def _disk_gb(self, requirements: Requirements) -> float:
        disk_gb = self.config.disk_gb
        bounds = requirements.disk
        if bounds is not None and bounds.min is not None:
            disk_gb = max(disk_gb, float(math.ceil(bounds.min)))

        if bounds is not None and bounds.max is not None:
            disk_gb = min(disk_gb, float(math.floor(bounds.max)))

        return disk_gb

    async def spot_prices(self, region: str) -> dict[str, float]:
        """Return the lowest current spot price per instance type in ``region``.

        Prices are kept for ``SPOT_PRICE_TTL_SECONDS``. A failed request is
        logged and gives no spot offers, so on-demand offers still appear.
        """
        cached = self._spot_prices.get(region)
        now = time.monotonic()
        if cached is not None and now - cached[0] < SPOT_PRICE_TTL_SECONDS:
            return cached[1]

        types = [entry.instance_type for entry in self.catalog_entries()]
        try:
            prices = await self._fetch_spot_prices(region, types)
        except BackendError as exc:
            log.warning("aws_spot_prices_failed", region=region, error=str(exc))
            return {}

        self._spot_prices[region] = (now, prices)

        return prices

    async def _fetch_spot_prices(
        self, region: str, types: list[str]
    ) -> dict[str, float]:
        prices: dict[str, float] = {}
        async with self._client(region, "DescribeSpotPriceHistory") as ec2:
            paginator = ec2.get_paginator("describe_spot_price_history")
            pages = paginator.paginate(
                InstanceTypes=types,
                ProductDescriptions=["Linux/UNIX"],
                StartTime=time.time(),
            )
            async for page in pages:
                for item in page.get("SpotPriceHistory", []):
                    instance_type = item["InstanceType"]
                    price = float(item["SpotPrice"])
                    prices[instance_type] = min(price, prices.get(instance_type, price))

        return prices

    # Instances

    async def create(self, instance_id: str, offer: Offer) -> Provisioned:
        """Launch an instance for ``offer``, or adopt the one already tagged with
        ``instance_id``, and wait until it runs.

        Raises:
            BackendError: an EC2 call failed, or the instance did not reach the
                running state within ``running_timeout_seconds`` (it is then
                terminated).
        """
        region = offer.region
        existing = [
            instance
            for instance in await self.list_tagged([region], instance_id=instance_id)
            if instance.alive
        ]
        if existing:
            ec2_instance_id = existing[0].ec2_instance_id
            log.info(
                "aws_instance_adopted",
                instance_id=instance_id,
                ec2_instance_id=ec2_instance_id,
            )
        else:
            ec2_instance_id = await self._run_instance(instance_id, offer)

        running = await self._wait_running(region, instance_id, ec2_instance_id)

        return Provisioned(
            resources=offer.resources,
            hostname=running.public_dns or running.public_ip or running.private_ip,
            backend_data={
                "ec2_instance_id": ec2_instance_id,
                "region": region,
                "host": running.public_ip or running.private_ip,
                "port": "22",
                "user": self.config.ssh_user,
                "key_path": self.key_path,
            },
        )

    async def _run_instance(self, instance_id: str, offer: Offer) -> str:
        region = offer.region
        key_name, group_id = await self._prepare_region(region)
        image_id, root_device = await self._image(region)
        labels = self.labels(instance_id)
        tags = [
            {"Key": TAG_INSTANCE_ID, "Value": instance_id},
            {"Key": TAG_DAEMON_ID, "Value": self.daemon_id},
            {"Key": TAG_POOL, "Value": labels.get("pool", "")},
            {"Key": "Name", "Value": labels.get("name", instance_id)},
        ]
        request: dict[str, Any] = {
            "ImageId": image_id,
            "InstanceType": offer.instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "ClientToken": instance_id,
            "KeyName": key_name,
            "SecurityGroupIds": [group_id],
            "BlockDeviceMappings": [
                {
                    "DeviceName": root_device,
                    "Ebs": {
                        "VolumeSize": int(offer.resources.disk_gb),
                        "VolumeType": "gp3",
                        "DeleteOnTermination": True,
                    },
                }
            ],
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": tags},
                {"ResourceType": "volume", "Tags": tags},
            ],
        }
        if offer.spot:
            request["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {
                    "SpotInstanceType": "one-time",
                    "InstanceInterruptionBehavior": "terminate",
                },
            }

        async with self._client(region, "RunInstances") as ec2:
            response = await ec2.run_instances(**request)

        ec2_instance_id: str = response["Instances"][0]["InstanceId"]
        log.info(
            "aws_instance_launched",
            instance_id=instance_id,
            ec2_instance_id=ec2_instance_id,
            region=region,
            instance_type=offer.instance_type,
            spot=offer.spot,
        )

        return ec2_instance_id

    async def _wait_running(
        self, region: str, instance_id: str, ec2_instance_id: str
    ) -> Ec2Instance:
        deadline = time.monotonic() + self.config.running_timeout_seconds
        while True:
            listed = await self.describe(region, [ec2_instance_id])
            instance = listed[0] if listed else None
            if instance is not None and instance.state == "running":
                return instance

            if instance is not None and not instance.alive:
                raise BackendError(
                    f"create instance {instance_id}: EC2 instance {ec2_instance_id} "
                    f"went to {instance.state} before it ran; try another offer"
                )

            if time.monotonic() >= deadline:
                await self._terminate_quietly(region, ec2_instance_id)
                state = instance.state if instance else "not listed"
                raise BackendError(
                    f"create instance {instance_id}: EC2 instance {ec2_instance_id} "
                    f"is still {state} after {self.config.running_timeout_seconds:g}s, "
                    "so it is being terminated; try again or raise "
                    "aws.running_timeout_seconds"
                )

            await self.sleep(self.config.poll_interval_seconds)

    async def _terminate_quietly(self, region: str, ec2_instance_id: str) -> None:
        try:
            await self.terminate_ec2(region, [ec2_instance_id])
        except BackendError as exc:
            log.error(
                "aws_instance_terminate_failed",
                ec2_instance_id=ec2_instance_id,
                error=str(exc),
            )

    async def terminate(self, instance_id: str, backend_data: dict[str, str]) -> None:
        """Terminate the instance and return once EC2 reports it terminated.

        An instance recorded before it was provisioned has no EC2 id, so it is
        found by its tag in every configured region. No instance at all counts
        as terminated.

        Raises:
            BackendError: an EC2 call failed, or the instance was not reported
                terminated within ``terminate_timeout_seconds``.
        """
        ec2_instance_id = backend_data.get("ec2_instance_id")
        region = backend_data.get("region")
        if ec2_instance_id and region:
            targets = {region: [ec2_instance_id]}
        else:
            targets = {}
            for instance in await self.list_tagged(instance_id=instance_id):
                if instance.alive:
                    targets.setdefault(instance.region, []).append(
                        instance.ec2_instance_id
                    )

        for region_name, ec2_ids in targets.items():
            await self.terminate_ec2(region_name, ec2_ids)
            await self._wait_terminated(instance_id, region_name, ec2_ids)

    async def _wait_terminated(
        self, instance_id: str, region: str, ec2_ids: list[str]
    ) -> None:
        deadline = time.monotonic() + self.config.terminate_timeout_seconds
        while True:
            pending = [
                instance
                for instance in await self.describe(region, ec2_ids)
                if instance.state != "terminated"
            ]
            if not pending:
                log.info(
                    "aws_instance_terminated",
                    instance_id=instance_id,
                    ec2_instance_ids=ec2_ids,
                )
                return

            if time.monotonic() >= deadline:
                states = ", ".join(f"{i.ec2_instance_id} {i.state}" for i in pending)
                raise BackendError(
                    f"terminate instance {instance_id}: EC2 reports {states} after "
                    f"{self.config.terminate_timeout_seconds:g}s; will retry"
                )

            await self.sleep(self.config.poll_interval_seconds)

    async def terminate_ec2(self, region: str, ec2_ids: list[str]) -> None:
        """Call ``TerminateInstances``; ids EC2 does not know count as done."""
        import botocore.exceptions

        try:
            async with self._client(region, "TerminateInstances") as ec2:
                await ec2.terminate_instances(InstanceIds=ec2_ids)
        except BackendError as exc:
            cause = exc.__cause__
            if isinstance(cause, botocore.exceptions.ClientError) and _error_code(
                cause
            ).startswith("InvalidInstanceID"):
                return

            raise

    def restore(self, live: list[LiveInstance]) -> None:
        """Do nothing: every call reads the EC2 id from ``backend_data``."""

    # Listing

    async def list_tagged(
        self, regions: list[str] | None = None, *, instance_id: str | None = None
    ) -> list[Ec2Instance]:
        """List this daemon's EC2 instances, ended ones included.

        ``regions`` defaults to the configured ones; ``instance_id`` narrows
        the list to the instances tagged with that id.
        """
        filters = [{"Name": f"tag:{TAG_DAEMON_ID}", "Values": [self.daemon_id]}]
        if instance_id is not None:
            filters.append({"Name": f"tag:{TAG_INSTANCE_ID}", "Values": [instance_id]})

        found: list[Ec2Instance] = []
        for region in regions or list(self.config.regions):
            found.extend(await self._describe_pages(region, Filters=filters))

        return found

    async def describe(self, region: str, ec2_ids: list[str]) -> list[Ec2Instance]:
        """Describe instances by EC2 id; ids EC2 does not know are left out."""
        import botocore.exceptions

        try:
            return await self._describe_pages(region, InstanceIds=ec2_ids)
        except BackendError as exc:
            cause = exc.__cause__
            if isinstance(cause, botocore.exceptions.ClientError) and _error_code(
                cause
            ).startswith("InvalidInstanceID"):
                return []

            raise

    async def _describe_pages(self, region: str, **request: Any) -> list[Ec2Instance]:
        found: list[Ec2Instance] = []
        async with self._client(region, "DescribeInstances") as ec2:
            paginator = ec2.get_paginator("describe_instances")
            async for page in paginator.paginate(**request):
                for reservation in page.get("Reservations", []):
                    for item in reservation.get("Instances", []):
                        found.append(_ec2_instance(region, item))

        return found

    # Key pair, security group and image

    async def _prepare_region(self, region: str) -> tuple[str, str]:
        """Create the key pair and the security group in ``region`` if missing.

        Returns the key pair's name and the security group's id.
        """
        async with self._prepare_lock:
            prepared = self._prepared.get(region)
            if prepared is None:
                public_key = await anyio.to_thread.run_sync(self._ensure_key_file)
                await self._ensure_key_pair(region, public_key)
                group_id = await self._ensure_security_group(region)
                prepared = (self.resource_name, group_id)
                self._prepared[region] = prepared

        return prepared

    def _ensure_key_file(self) -> str:
        """Create the private key on first use and return its public key."""
        import asyncssh

        os.makedirs(self.key_dir, mode=0o700, exist_ok=True)
        if not os.path.exists(self.key_path):
            key = asyncssh.generate_private_key("ssh-ed25519")
            temporary = self.key_path + ".tmp"
            descriptor = os.open(
                temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600
            )
            with os.fdopen(descriptor, "wb") as file:
                file.write(key.export_private_key())
                file.flush()
                os.fsync(file.fileno())

            os.replace(temporary, self.key_path)
            log.info("aws_key_created", path=self.key_path)

        key = asyncssh.read_private_key(self.key_path)

        return bytes(key.export_public_key()).decode().strip()

    async def _ensure_key_pair(self, region: str, public_key: str) -> None:
        import botocore.exceptions

        try:
            async with self._client(region, "DescribeKeyPairs") as ec2:
                await ec2.describe_key_pairs(KeyNames=[self.resource_name])
            return
        except BackendError as exc:
            cause = exc.__cause__
            if not (
                isinstance(cause, botocore.exceptions.ClientError)
                and _error_code(cause) == "InvalidKeyPair.NotFound"
            ):
                raise

        async with self._client(region, "ImportKeyPair") as ec2:
            await ec2.import_key_pair(
                KeyName=self.resource_name,
                PublicKeyMaterial=public_key.encode(),
                TagSpecifications=[
                    {
                        "ResourceType": "key-pair",
                        "Tags": [{"Key": TAG_DAEMON_ID, "Value": self.daemon_id}],
                    }
                ],
            )

        log.info("aws_key_pair_imported", region=region, key_name=self.resource_name)

    async def _ensure_security_group(self, region: str) -> str:
        name = self.resource_name
        async with self._client(region, "DescribeSecurityGroups") as ec2:
            response = await ec2.describe_security_groups(
                Filters=[{"Name": "group-name", "Values": [name]}]
            )

        groups = response.get("SecurityGroups", [])
        if groups:
            group_id: str = groups[0]["GroupId"]
            return group_id

        async with self._client(region, "CreateSecurityGroup") as ec2:
            created = await ec2.create_security_group(
                GroupName=name,
                Description="SSH to instances of dstackd " + self.daemon_id,
                TagSpecifications=[
                    {
                        "ResourceType": "security-group",
                        "Tags": [{"Key": TAG_DAEMON_ID, "Value": self.daemon_id}],
                    }
                ],
            )
            group_id = created["GroupId"]
            await ec2.authorize_security_group_ingress(
                GroupId=group_id,
                IpPermissions=[
                    {
                        "IpProtocol": "tcp",
                        "FromPort": 22,
                        "ToPort": 22,
                        "IpRanges": [{"CidrIp": self.config.ssh_cidr}],
                    }
                ],
            )

        log.info("aws_security_group_created", region=region, group_id=group_id)

        return group_id

    async def _image(self, region: str) -> tuple[str, str]:
        """Return the image id and its root device name."""
        request: dict[str, Any]
        if self.config.image_id is not None:
            request = {"ImageIds": [self.config.image_id]}
        else:
            request = {
                "Owners": [UBUNTU_OWNER],
                "Filters": [
                    {"Name": "name", "Values": [UBUNTU_IMAGE_NAME]},
                    {"Name": "state", "Values": ["available"]},
                ],
            }

        async with self._client(region, "DescribeImages") as ec2:
            response = await ec2.describe_images(**request)

        images = sorted(
            response.get("Images", []), key=lambda i: i.get("CreationDate", "")
        )
        if not images:
            raise BackendError(
                f"no image found in {region} for {json.dumps(request)}; set "
                "aws.image_id to an image available in that region"
            )

        image = images[-1]

        return image["ImageId"], image.get("RootDeviceName", "/dev/sda1")

    # Clients

    def _client(self, region: str, operation: str) -> "_Ec2Client":
        if self._session is None:
            import aioboto3

            self._session = aioboto3.Session()

        return _Ec2Client(self._session, region, self.config.endpoint_url, operation)


class _Ec2Client(AbstractAsyncContextManager[Any]):
    """An EC2 client for one region whose errors become ``BackendError``.

    The message contains the operation, the region, and EC2's error code and
    message, but no request parameters or credentials.
    """

    def __init__(
        self, session: Any, region: str, endpoint_url: str | None, operation: str
    ) -> None:
        from botocore.config import Config

        self._context = session.client(
            "ec2",
            region_name=region,
            endpoint_url=endpoint_url,
            config=Config(
                connect_timeout=10,
                read_timeout=30,
                retries={"max_attempts": 3, "mode": "standard"},
            ),
        )
        self._region = region
        self._operation = operation

    async def __aenter__(self) -> Any:
        return await self._context.__aenter__()

    async def __aexit__(self, exc_type: Any, exc: Any, traceback: Any) -> bool:
        import botocore.exceptions

        await self._context.__aexit__(exc_type, exc, traceback)
        if isinstance(exc, botocore.exceptions.ClientError):
            message = exc.response.get("Error", {}).get("Message", "")
            raise BackendError(
                f"EC2 {self._operation} in {self._region} failed: "
                f"{_error_code(exc)}: {message}"
            ) from exc

        if isinstance(exc, botocore.exceptions.BotoCoreError):
            raise BackendError(
                f"EC2 {self._operation} in {self._region} failed: {exc}"
            ) from exc

        return False


def _error_code(error: Any) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _ec2_instance(region: str, item: dict[str, Any]) -> Ec2Instance:
    tags = {tag["Key"]: tag["Value"] for tag in item.get("Tags", [])}
    launch_time = item.get("LaunchTime")

    return Ec2Instance(
        ec2_instance_id=item["InstanceId"],
        region=region,
        state=item.get("State", {}).get("Name", "unknown"),
        instance_id=tags.get(TAG_INSTANCE_ID, ""),
        daemon_id=tags.get(TAG_DAEMON_ID, ""),
        launched_at=launch_time.timestamp() if launch_time is not None else 0.0,
        public_ip=item.get("PublicIpAddress", ""),
        private_ip=item.get("PrivateIpAddress", ""),
        public_dns=item.get("PublicDnsName", ""),
    )


def _entry_offers(
    entry: CatalogEntry, region: str, disk_gb: float, spot_price: float | None
) -> list[Offer]:
    on_demand_price = entry.prices.get(region)
    if on_demand_price is None:
        return []

    gpus: list[Gpu] = []
    for gpu in entry.gpus:
        gpus.extend(Gpu(gpu.name, float(gpu.memory_gb)) for _ in range(gpu.count))

    resources = Resources(
        cpus=entry.vcpus,
        memory_gb=float(entry.memory_gb),
        gpus=tuple(gpus),
        disk_gb=disk_gb,
    )
    offers = [
        Offer(
            BACKEND_NAME, region, entry.instance_type, resources, False, on_demand_price
        )
    ]
    if spot_price is not None:
        offers.append(
            Offer(
                BACKEND_NAME, region, entry.instance_type, resources, True, spot_price
            )
        )

    return offers


def _offer_order(offer: Offer) -> tuple[float, str, str, bool]:
    return (offer.price, offer.region, offer.instance_type, offer.spot)


def instance_labels(state: State, instance_id: str) -> dict[str, str]:
    """Return the pool and the name of an instance, for its tags."""
    instance = state.instances.get(instance_id)
    if instance is None:
        return {}

    return {"pool": instance.pool, "name": instance.name}
