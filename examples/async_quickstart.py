"""The async quick start, as in Modal's guide: ``put.aio`` and ``get.aio``.

Every I/O method of ``Dict`` has an ``.aio`` twin that waits for the daemon on the event
loop instead of blocking it.
"""

import asyncio

from sharedict import Dict

dictionary = Dict.from_name("async-dict", create_if_missing=True)


async def main() -> None:
    await dictionary.put.aio("key", "value")  # set a value asynchronously
    value = await dictionary.get.aio("key")  # get a value asynchronously
    print(f"key: {value}")


if __name__ == "__main__":
    asyncio.run(main())
