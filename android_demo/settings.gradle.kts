// edge-gemma Android demo: `app` (the Android app) depends on `core` (pure Kotlin/JVM, unit-tested in CI without
// the Android SDK, see tests/test_android_demo.py). Every version lives in gradle/libs.versions.toml.
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}

dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google() // com.google.ai.edge.litertlm and androidx live on Google Maven
        mavenCentral()
    }
}

rootProject.name = "edge-gemma-android-demo"
include(":app", ":core")
