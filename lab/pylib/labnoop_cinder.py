"""Cinder backend for the slipstream lab: keeps no data at all.

cinder's in-tree FakeLoggingVolumeDriver (create/delete/extend/snapshot/attach/detach are
bookkeeping),
plus no-op image<->volume copies so volume-from-image and boot-from-volume work without qemu-img.
"""

import io

from cinder.tests.fake_driver import FakeLoggingVolumeDriver


class LabFakeVolumeDriver(FakeLoggingVolumeDriver):
    def copy_image_to_volume(self, context, volume, image_service, image_id, disable_sparse=False):
        pass  # nothing to write: volumes hold no data

    def copy_volume_to_image(self, context, volume, image_service, image_meta):
        # give glance a tiny payload so the uploaded image goes 'active'
        image_service.update(context, image_meta["id"], {}, io.BytesIO(b"\0" * 512))
