"""The stand-in URL scheme of the tests, `mirror://`: importing this module registers it with Apache
Beam's filesystems (a FileSystem subclass joins the registry by being defined)."""

from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.localfilesystem import LocalFileSystem


class MirrorFileSystem(LocalFileSystem):
    """The local disk under a URL scheme: files named by URL go through Beam's filesystem registry, as
    gs:// or s3:// files do, without a network."""

    PREFIX = "mirror://"

    @classmethod
    def scheme(cls):
        return "mirror"

    def _local(self, path):
        return path.removeprefix(self.PREFIX)

    def exists(self, path):
        return super().exists(self._local(path))

    def metadata(self, path):
        found = super().metadata(self._local(path))
        return FileMetadata(path, found.size_in_bytes, found.last_updated_in_seconds)

    def _url_dirname(self, url):
        return self.PREFIX + super()._url_dirname(self._local(url))

    def _list(self, prefix):
        for found in super()._list(self._local(prefix)):
            yield FileMetadata(self.PREFIX + found.path, found.size_in_bytes, found.last_updated_in_seconds)

    def _path_open(self, path, *args, **kwargs):
        return super()._path_open(self._local(path), *args, **kwargs)

    def create(self, path, *args, **kwargs):
        return super().create(self._local(path), *args, **kwargs)

    def rename(self, sources, destinations):
        return super().rename([self._local(p) for p in sources], [self._local(p) for p in destinations])

    def delete(self, paths):
        return super().delete([self._local(p) for p in paths])
