package org.edgegemma.demo

import android.content.Context
import org.edgegemma.core.ArtifactManifest
import org.edgegemma.core.BundleEntry
import org.edgegemma.core.BundleIndex
import org.edgegemma.core.ChatTemplateCheck
import org.edgegemma.core.ManifestReader
import java.io.File
import java.io.FileNotFoundException
import java.security.DigestInputStream
import java.security.MessageDigest

/** A bundle ready for LiteRT-LM: its validated manifest and the `.litertlm` as a real file path. */
data class LoadedBundle(val entry: BundleEntry, val manifest: ArtifactManifest, val litertlmPath: String)

/** The `.litertlm` of a `device` bundle is not on the device yet; [expectedPath] is where to adb push it. */
class MissingModelFileException(val expectedPath: String) : IllegalStateException("$expectedPath: not found; push the .litertlm with adb")

/**
 * Finds the bundle `make android-bundle` put into the APK and checks it before LiteRT-LM sees it: the index, the
 * manifest (schema version, litert backend, .litertlm listed; core's [ManifestReader]), the chat template's sha256
 * ([ChatTemplateCheck]) and the `.litertlm` itself (size, and sha256 when it is copied out of the APK).
 *
 * LiteRT-LM needs a file path, and APK assets are not files: an `assets` bundle is copied once into the app's
 * private storage (`filesDir/<name>/...`), its sha256 computed while copying; later starts reuse the copy when its
 * size and a marker holding the verified sha256 match. A `device` bundle is read where adb pushed it.
 */
class BundleLoader(private val context: Context) {
    fun index(): BundleIndex {
        val text = try {
            context.assets.open(BundleIndex.INDEX_FILE).bufferedReader().use { it.readText() }
        } catch (e: FileNotFoundException) {
            throw IllegalStateException(context.getString(R.string.no_bundle))
        }
        return BundleIndex.parse(text, "assets/${BundleIndex.INDEX_FILE}")
    }

    /** Validate and prepare [entry]; slow on first start for an `assets` bundle (one copy of the model). */
    fun load(entry: BundleEntry): LoadedBundle {
        val manifestText = context.assets.open(entry.manifest).bufferedReader().use { it.readText() }
        val manifest = ManifestReader.parse(manifestText, "assets/${entry.manifest}")
        val template = context.assets.open(entry.chatTemplate).use { it.readBytes() }
        ChatTemplateCheck.verify(manifest, template, "assets/${entry.chatTemplate}")
        val path = when (entry.litertlmLocation) {
            "assets" -> copyOut(entry, manifest)
            else -> onDevice(entry, manifest)
        }
        return LoadedBundle(entry, manifest, path)
    }

    private fun onDevice(entry: BundleEntry, manifest: ArtifactManifest): String {
        val base = context.getExternalFilesDir(null) ?: throw IllegalStateException("external files directory unavailable")
        val file = File(base, entry.litertlm)
        if (!file.isFile) throw MissingModelFileException(file.path)
        if (file.length() != manifest.litertlm.size) {
            throw IllegalStateException("${file.path}: ${file.length()} bytes, but the manifest lists ${manifest.litertlm.size}; push the file again")
        }
        return file.path
    }

    private fun copyOut(entry: BundleEntry, manifest: ArtifactManifest): String {
        val dst = File(context.filesDir, entry.litertlm)
        val marker = File(dst.path + ".sha256")
        if (dst.isFile && dst.length() == manifest.litertlm.size && marker.isFile && marker.readText() == manifest.litertlm.sha256) {
            return dst.path
        }
        dst.parentFile?.mkdirs()
        val tmp = File(dst.path + ".tmp")
        val md = MessageDigest.getInstance("SHA-256")
        context.assets.open(entry.litertlm).use { input ->
            DigestInputStream(input, md).use { digest -> tmp.outputStream().use { digest.copyTo(it, 1 shl 20) } }
        }
        val sha = md.digest().joinToString("") { "%02x".format(it.toInt() and 0xff) }
        if (sha != manifest.litertlm.sha256 || tmp.length() != manifest.litertlm.size) {
            tmp.delete()
            throw IllegalStateException(
                "assets/${entry.litertlm}: sha256 $sha (${tmp.length()} bytes) differs from the manifest's " +
                    "${manifest.litertlm.sha256} (${manifest.litertlm.size} bytes); rerun make android-bundle",
            )
        }
        if (!tmp.renameTo(dst)) throw IllegalStateException("cannot rename ${tmp.path} to ${dst.path}")
        marker.writeText(sha)
        return dst.path
    }

    companion object {
        /** For messages: where a `device` bundle's `.litertlm` goes (adb push destination). */
        fun devicePath(context: Context, entry: BundleEntry): String =
            File(context.getExternalFilesDir(null), entry.litertlm).path
    }
}
