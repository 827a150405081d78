# The berth-lifecycle job: the cacher's configuration and the repacking of diego's Docker lifecycle bundle.
require 'digest'
require_relative 'spec_helper'

RSpec.describe 'berth-lifecycle job' do
  let(:job) { release_job('berth-lifecycle') }
  let(:registry_link) do
    { 'address' => 'q-s0.berth-registry.default.cf.bosh',
      'properties' => { 'berth' => {
        'registry' => { 'port' => 8443, 'external_name' => 'berth-registry.service.cf.internal',
                        'tls' => { 'certificate' => 'CERT', 'ca' => 'CA PEM' } },
        'cache' => { 'enabled' => true, 'namespace' => 'cache', 'robot_password' => 'robot-pw' }
      } } }
  end

  def cacher_config(properties = {}, links = { 'berth-registry' => registry_link })
    YAML.safe_load(job.render('config/berth-cacher.yml', properties: properties, links: links))
  end

  describe 'config/berth-cacher.yml' do
    it 'takes the registry from the berth-registry link' do
      expect(cacher_config).to eq(
        'registry' => { 'url' => 'https://berth-registry.service.cf.internal:8443',
                        'ca_file' => '/tmp/lifecycle/berth-registry-ca.pem',
                        'username' => 'robot$berth-cacher', 'password' => 'robot-pw' },
        'namespace' => 'cache', 'cache_by_default' => false,
        'platform' => 'linux/amd64', 'keep_index' => false, 'parallel_blobs' => 8, 'attempts' => 5,
        'copy_timeout_seconds' => 600, 'on_cache_failure' => 'stage-uncached'
      )
    end

    it 'takes the copy deadline and what to do when caching fails, and refuses nonsense' do
      config = cacher_config('berth' => { 'cacher' => { 'copy_timeout_seconds' => 120, 'on_cache_failure' => 'fail' } })
      expect(config).to include('copy_timeout_seconds' => 120, 'on_cache_failure' => 'fail')
      expect { cacher_config('berth' => { 'cacher' => { 'on_cache_failure' => 'retry' } }) }
        .to raise_error(/on_cache_failure must be stage-uncached or fail/)
      expect { cacher_config('berth' => { 'cacher' => { 'copy_timeout_seconds' => 0 } }) }
        .to raise_error(/copy_timeout_seconds must be at least 1/)
    end

    it 'carries no credential at all when the registry trusts instance identities' do
      registry_link['properties']['berth']['cache']['instance_identity'] = { 'ca_certificates' => ['CA PEM'] }
      rendered = job.render('config/berth-cacher.yml', properties: {}, links: { 'berth-registry' => registry_link })
      expect(YAML.safe_load(rendered)['registry']).to eq('url' => 'https://berth-registry.service.cf.internal:8443',
                                                         'ca_file' => '/tmp/lifecycle/berth-registry-ca.pem',
                                                         'identity' => 'instance')
      expect(rendered).not_to match(/password|username|robot|repository_key|PRIVATE KEY/)
      # Even with a password offered, by the link (a robot kept while moving over) or a property.
      own = job.render('config/berth-cacher.yml', properties: { 'berth' => { 'cacher' => { 'registry' => { 'password' => 'own-pw' } } } },
                                                  links: { 'berth-registry' => registry_link })
      expect(own).not_to include('robot-pw', 'own-pw')
    end

    it 'follows its own identity property over the link' do
      registry_link['properties']['berth']['cache']['instance_identity'] = { 'ca_certificates' => ['CA PEM'] }
      config = cacher_config('berth' => { 'cacher' => { 'registry' => { 'identity' => 'password' } } })
      expect(config['registry']).to include('username' => 'robot$berth-cacher', 'password' => 'robot-pw')
      expect { cacher_config('berth' => { 'cacher' => { 'registry' => { 'identity' => 'token' } } }) }
        .to raise_error(/must be instance or password/)
      expect { cacher_config({ 'berth' => { 'cacher' => { 'registry' => { 'url' => 'http://r:1', 'identity' => 'instance' } } } }, {}) }
        .to raise_error(/identity instance needs TLS/)
    end

    it "falls back to the link's BOSH DNS address without an external name" do
      registry_link['properties']['berth']['registry'].delete('external_name')
      expect(cacher_config['registry']['url']).to eq('https://q-s0.berth-registry.default.cf.bosh:8443')
    end

    it 'prefers its own properties over the link' do
      config = cacher_config('berth' => {
                               'lifecycle' => { 'unpacked_at' => '/bundle' },
                               'cacher' => { 'registry' => { 'url' => 'https://r.example:9443', 'name' => 'r.example:9443',
                                                             'ca' => 'OTHER CA', 'password' => 'own-pw' },
                                             'namespace' => 'mirror', 'cache_by_default' => true,
                                             'platform' => 'linux/arm64/v8', 'keep_index' => true,
                                             'parallel_blobs' => 8, 'attempts' => 2 }
                             })
      expect(config).to eq(
        'registry' => { 'url' => 'https://r.example:9443', 'name' => 'r.example:9443',
                        'ca_file' => '/bundle/berth-registry-ca.pem',
                        'username' => 'robot$berth-cacher', 'password' => 'own-pw' },
        'namespace' => 'mirror', 'cache_by_default' => true, 'platform' => 'linux/arm64/v8',
        'keep_index' => true, 'parallel_blobs' => 8, 'attempts' => 2,
        'copy_timeout_seconds' => 600, 'on_cache_failure' => 'stage-uncached'
      )
    end

    it 'names the registries berth-registry mirrors, in a configuration the real berth-cacher accepts' do
      properties = { 'berth' => { 'cacher' => { 'proxies' => { 'docker.io' => 'hub', 'ghcr.io' => 'ghcr' } } } }
      config = cacher_config(properties)
      expect(config['proxies']).to eq('docker.io' => 'hub', 'ghcr.io' => 'ghcr')
      expect(cacher_config).not_to have_key('proxies')
      file = File.join(tmp, 'berth-cacher.yml')
      File.write(file, YAML.dump(config))
      # The configuration is read before the image reference, which is bad on purpose: the run
      # stops there, having accepted the configuration.
      _, err, status = Open3.capture3({ 'BERTH_CACHER_CONFIG' => file }, BerthSpec.binary('BERTH_CACHER_BIN'),
                                      "-outputMetadataJSONFilename=#{tmp}/result.json", '-dockerRef=Bad/Name')
      expect(status).not_to be_success
      expect(err).to include('Staging process failed: image reference "Bad/Name"')
      expect(err).not_to include('cacher configuration')
      expect { cacher_config('berth' => { 'cacher' => { 'proxies' => { 'registry-1.docker.io' => 'hub' } } }) }
        .to raise_error(/name Docker Hub docker.io/)
      expect { cacher_config('berth' => { 'cacher' => { 'proxies' => { 'docker.io' => 'hub/x' } } }) }
        .to raise_error(/one lowercase repository path component/)
    end

    it 'works without the link from properties alone' do
      config = cacher_config({ 'berth' => { 'cacher' => { 'registry' => { 'url' => 'https://r:1' } } } }, {})
      expect(config['registry']).to eq('url' => 'https://r:1')
      expect(config).not_to have_key('namespace')
    end

    {
      'no registry at all' => [{}, {}, /set berth.cacher.registry.url or consume the berth-registry link/],
      'a URL without scheme' => [{ 'berth' => { 'cacher' => { 'registry' => { 'url' => 'r:1' } } } }, {}, /must start with https:/],
      'a password over plain HTTP' => [{ 'berth' => { 'cacher' => { 'registry' => { 'url' => 'http://r:1', 'password' => 'pw' } } } }, {},
                                       /in the clear: http:\/\/r:1 is not https/],
      'a repository key, which would make names computable from app GUIDs' =>
        [{ 'berth' => { 'cacher' => { 'repository_key' => 'ab' * 32 } } }, nil, /repository_key/],
      'a platform without arch' => [{ 'berth' => { 'cacher' => { 'platform' => 'linux' } } }, nil, %r{must be os/arch}],
      'no parallelism' => [{ 'berth' => { 'cacher' => { 'parallel_blobs' => 0 } } }, nil, /at least 1/]
    }.each do |what, (properties, links, message)|
      it "refuses #{what}" do
        expect { cacher_config(properties, links || { 'berth-registry' => registry_link }) }.to raise_error(message)
      end
    end

    it 'refuses a registry whose cache is disabled' do
      registry_link['properties']['berth']['cache']['enabled'] = false
      expect { cacher_config }.to raise_error(/caching is disabled there/)
    end

    it 'refuses links it does not consume' do
      expect { cacher_config({}, { 'nats' => {} }) }.to raise_error(/links nats are not consumed/)
    end
  end

  describe 'config/registry-ca.pem' do
    it 'is the link CA, the property, or empty' do
      links = { 'berth-registry' => registry_link }
      expect(job.render('config/registry-ca.pem', links: links)).to eq('CA PEM')
      expect(job.render('config/registry-ca.pem', properties: { 'berth' => { 'cacher' => { 'registry' => { 'ca' => 'MINE' } } } },
                                                  links: links)).to eq('MINE')
      expect(job.render('config/registry-ca.pem')).to eq('')
    end
  end

  describe 'bin/pre-start' do
    let(:root) { tmp }
    let(:source) { "#{root}/packages/docker_app_lifecycle/docker_app_lifecycle.tgz" }
    let(:static) { "#{root}/jobs/file_server/packages" }
    let(:published) { "#{static}/berth_docker_app_lifecycle/docker_app_lifecycle.tgz" }
    let(:originals) { %w[builder launcher healthcheck diego-sshd cf-pcap].to_h { |e| [e, SecureRandom.random_bytes(4096)] } }
    let(:env) { { 'BERTH_JOB_DIR' => "#{root}/jobs/berth-lifecycle", 'BERTH_PACKAGE_DIR' => install_package(root) } }
    let(:rendered) do
      install_job(root, 'berth-lifecycle',
                  properties: { 'berth' => { 'lifecycle' => { 'source' => source, 'static_directory' => static } } },
                  links: { 'berth-registry' => registry_link })
    end

    def make_bundle(entries)
      dir = Dir.mktmpdir('bundle', tmp)
      entries.each do |name, bytes|
        File.binwrite(File.join(dir, name), bytes)
        File.chmod(0o755, File.join(dir, name))
      end
      FileUtils.mkdir_p(File.dirname(source))
      run!({}, 'tar', '-czf', source, '-C', dir, *entries.keys)
    end

    def unpack(tgz)
      dir = Dir.mktmpdir('unpacked', tmp)
      run!({}, 'tar', '-xzf', tgz, '-C', dir)
      dir
    end

    def pre_start
      Open3.capture3(env, "#{root}/jobs/berth-lifecycle/bin/pre-start")
    end

    it 'swaps in berth-cacher with its configuration, keeps the rest byte for byte, and can run again' do
      make_bundle(originals)
      rendered
      FileUtils.mkdir_p(File.dirname(published))
      File.write("#{File.dirname(published)}/.docker_app_lifecycle.tgz.Xy12Ab", 'left by a killed run')
      2.times do
        _, err, status = pre_start
        expect(status).to be_success, err
      end

      names = run!({}, 'tar', '-tzf', published).lines.map(&:chomp)
      expect(names).to contain_exactly(*originals.keys, 'berth-cacher.yml', 'berth-registry-ca.pem')
      unpacked = unpack(published)
      expect(File.binread("#{unpacked}/builder")).to eq(File.binread(BerthSpec.binary('BERTH_CACHER_BIN')))
      (originals.keys - ['builder']).each do |entry|
        expect(File.binread("#{unpacked}/#{entry}")).to eq(originals[entry]), "#{entry} changed"
      end
      expect(File.read("#{unpacked}/berth-cacher.yml")).to eq(rendered['config/berth-cacher.yml'])
      expect(File.read("#{unpacked}/berth-registry-ca.pem")).to eq('CA PEM')
      expect(File.stat("#{unpacked}/builder").mode & 0o777).to eq(0o755)
      expect(File.stat("#{unpacked}/berth-cacher.yml").mode & 0o777).to eq(0o644)
      expect(Dir.children(File.dirname(published))).to eq(['docker_app_lifecycle.tgz'])
    end

    # file_server's ETag is the bundle's sha256, and cells revalidate their cached copy against
    # whichever api VM they reach: every VM must publish the same bytes, whenever it ran.
    it 'publishes the same bytes on every run' do
      # A small stand-in cacher: this is about the archive, and gzipping a debug build is slow.
      FileUtils.mkdir_p("#{root}/small/bin")
      File.write("#{root}/small/bin/berth-cacher", "#!/bin/sh\n")
      env['BERTH_PACKAGE_DIR'] = "#{root}/small"
      make_bundle(originals)
      rendered
      bundles = 2.times.map do |i|
        sleep 1.1 if i.positive?
        _, err, status = pre_start
        expect(status).to be_success, err
        Digest::SHA256.file(published).hexdigest
      end
      expect(bundles[1]).to eq(bundles[0])
    end

    it 'fails loudly when diego has not installed the bundle' do
      rendered
      _, err, status = pre_start
      expect(status).not_to be_success
      expect(err).to include("#{source} is missing: colocate this job with diego's file_server")
    end

    %w[builder launcher healthcheck diego-sshd].each do |entry|
      it "fails loudly, keeping the published bundle, when the source lacks #{entry}" do
        # A small stand-in cacher: this is about the bundle, and gzipping a debug build is slow.
        FileUtils.mkdir_p("#{root}/small/bin")
        File.write("#{root}/small/bin/berth-cacher", "#!/bin/sh\n")
        env['BERTH_PACKAGE_DIR'] = "#{root}/small"
        make_bundle(originals)
        rendered
        expect(pre_start[2]).to be_success
        before = File.binread(published)

        make_bundle(originals.reject { |name, _| name == entry })
        _, err, status = pre_start
        expect(status).not_to be_success
        expect(err).to include("has no #{entry} at its top level")
        expect(File.binread(published)).to eq(before)
        expect(Dir.children(File.dirname(published))).to eq(['docker_app_lifecycle.tgz'])
      end
    end
  end
end
