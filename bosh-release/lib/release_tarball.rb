# Assembles a BOSH release tarball (release.MF, jobs/*.tgz, packages/*.tgz) from the repository's
# jobs/ and packages/ and a src/ directory holding the packages' files, without the bosh CLI.
#
# The job and package archives hold what `bosh create-release` packs: a job's spec as job.MF, its
# monit, properties_schema.json when there is one and its listed templates; a package's
# packaging and the files its spec's `files` globs match under src/. Like the bosh CLI, a file is
# packed 0755 when its owner may execute it and 0644 otherwise.
#
# Fingerprints: the sha1 of a sorted listing with one "path mode sha1-of-content" line per file of
# the job or package (plus "dependency NAME FINGERPRINT" lines for packages), so a fingerprint
# changes exactly when something that ends up on the VM does. As in dev releases made by the bosh
# CLI, a job's or package's version is its fingerprint. Archives are written with fixed owners,
# modes and mtimes, so the same inputs give byte-identical tarballs.
require 'digest'
require 'fileutils'
require 'tmpdir'
require 'yaml'

class ReleaseTarball
  class Error < StandardError; end

  def initialize(repo:, src_dir:, name:, version:, commit_hash:, uncommitted_changes:)
    @repo = repo
    @src_dir = src_dir
    @name = name
    @version = version
    @commit_hash = commit_hash
    @uncommitted_changes = uncommitted_changes
  end

  def write(out)
    Dir.mktmpdir('berth-release') do |work|
      packages = build_packages(work)
      jobs = build_jobs(work, packages)
      manifest = {
        'name' => @name, 'version' => @version, 'commit_hash' => @commit_hash,
        'uncommitted_changes' => @uncommitted_changes, 'jobs' => jobs, 'packages' => packages.values
      }
      root = File.join(work, 'release')
      File.write(File.join(root, 'release.MF'), YAML.dump(manifest))
      FileUtils.mkdir_p(File.dirname(out))
      tmp = "#{out}.tmp-#{Process.pid}"
      archive(root, tmp)
      File.rename(tmp, out)
    ensure
      FileUtils.rm_f(tmp) if tmp
    end
  end

  private

  def build_packages(work)
    Dir[File.join(@repo, 'packages', '*', 'spec')].sort.each_with_object({}) do |spec_path, built|
      spec = YAML.safe_load(File.read(spec_path))
      name = spec.fetch('name')
      dir = File.dirname(spec_path)
      tree = File.join(work, 'package', name)
      place(File.join(dir, 'packaging'), File.join(tree, 'packaging'))
      spec.fetch('files', []).each do |pattern|
        matches = Dir.glob(pattern, base: @src_dir).select { |file| File.file?(File.join(@src_dir, file)) }
        raise Error, "package #{name}: nothing in #{@src_dir} matches #{pattern}" if matches.empty?

        matches.each { |file| place(File.join(@src_dir, file), File.join(tree, file)) }
      end
      dependencies = spec.fetch('dependencies', []) || []
      missing = dependencies - built.keys
      raise Error, "package #{name} depends on unknown or later packages: #{missing.join(', ')}" unless missing.empty?

      extra = dependencies.map { |d| "dependency #{d} #{built[d]['fingerprint']}" }
      built[name] = entry(name, tree, File.join(work, 'release', 'packages', "#{name}.tgz"), extra)
                    .merge('dependencies' => dependencies)
    end
  end

  def build_jobs(work, packages)
    Dir[File.join(@repo, 'jobs', '*', 'spec')].sort_by { |path| File.basename(File.dirname(path)) }.map do |spec_path|
      spec = YAML.safe_load(File.read(spec_path))
      name = spec.fetch('name')
      dir = File.dirname(spec_path)
      raise Error, "job directory #{File.basename(dir)} holds job #{name}" unless File.basename(dir) == name

      templates = spec.fetch('templates', {}) || {}
      on_disk = Dir.children(File.join(dir, 'templates')).sort
      unlisted = on_disk - templates.keys
      raise Error, "job #{name}: templates/#{unlisted.join(', templates/')} not listed in its spec" unless unlisted.empty?

      job_packages = spec.fetch('packages', []) || []
      unknown = job_packages - packages.keys
      raise Error, "job #{name} uses unknown packages: #{unknown.join(', ')}" unless unknown.empty?

      tree = File.join(work, 'job', name)
      place(spec_path, File.join(tree, 'job.MF'))
      place(File.join(dir, 'monit'), File.join(tree, 'monit'))
      schema = File.join(dir, 'properties_schema.json')
      place(schema, File.join(tree, 'properties_schema.json')) if File.file?(schema)
      templates.each_key do |source|
        path = File.join(dir, 'templates', source)
        raise Error, "job #{name}: template #{source} is listed but missing" unless File.file?(path)

        place(path, File.join(tree, 'templates', source))
      end
      entry(name, tree, File.join(work, 'release', 'jobs', "#{name}.tgz"), [])
        .merge('packages' => job_packages)
    end
  end

  def place(source, destination)
    raise Error, "#{source} does not exist" unless File.file?(source)

    FileUtils.mkdir_p(File.dirname(destination))
    FileUtils.cp(source, destination)
    File.chmod(File.stat(source).mode & 0o100 == 0 ? 0o644 : 0o755, destination)
  end

  def entry(name, tree, archive_path, extra_lines)
    listing = Dir.glob('**/*', base: tree).sort.filter_map do |path|
      full = File.join(tree, path)
      next unless File.file?(full)

      format('%<path>s %<mode>o %<sha1>s', path: path, mode: File.stat(full).mode & 0o777,
                                           sha1: Digest::SHA1.file(full).hexdigest)
    end
    fingerprint = Digest::SHA1.hexdigest((listing + extra_lines).join("\n"))
    FileUtils.mkdir_p(File.dirname(archive_path))
    archive(tree, archive_path)
    { 'name' => name, 'version' => fingerprint, 'fingerprint' => fingerprint,
      'sha1' => Digest::SHA1.file(archive_path).hexdigest }
  end

  def archive(dir, path)
    tar = %w[tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=gnu -cf -]
    File.open(path, 'wb') do |file|
      IO.pipe do |reader, writer|
        tar_pid = spawn(*tar, '-C', dir, '.', out: writer)
        writer.close
        gzip_pid = spawn('gzip', '-n', in: reader, out: file)
        reader.close
        [[tar_pid, 'tar'], [gzip_pid, 'gzip']].each do |pid, tool|
          Process.wait(pid)
          raise Error, "#{tool} failed writing #{path}" unless $?.success?
        end
      end
    end
  end
end

if $PROGRAM_NAME == __FILE__
  repo, src_dir, version, out, commit_hash, dirty = ARGV
  final = YAML.safe_load(File.read(File.join(repo, 'config', 'final.yml')))
  begin
    ReleaseTarball.new(repo: repo, src_dir: src_dir, name: final.fetch('name'), version: version,
                       commit_hash: commit_hash, uncommitted_changes: dirty == 'true').write(out)
  rescue ReleaseTarball::Error => e
    warn "bosh-release/build: #{e.message}"
    exit 1
  end
end
