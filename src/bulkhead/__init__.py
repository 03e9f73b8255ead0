"""bulkhead: a security-hardened virtual machine monitor and management plane on Linux KVM."""

__all__ = ["__version__"]
__version__ = "0.1.0"
